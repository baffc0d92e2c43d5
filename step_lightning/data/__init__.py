"""Datamodules for the real datasets (ADE20K, COCO-Stuff-10k/164k, Cityscapes) and the synthetic one."""
