"""SAM 3 promptable-concept segmentation (keras-hub, torch backend) for project pre-annotation."""
