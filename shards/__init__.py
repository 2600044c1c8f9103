"""IXI and other T1/T2 sources into WebDataset shards of normalized axial slices (`python -m shards`)."""

__version__ = "0.1.0"
