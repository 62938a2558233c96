"""batchseg: folders of unlabelled images to segmentation datasets."""
__version__ = "0.1.0"
