"""Reading images and writing masks: what an input is, how DICOM is displayed, and the display orientation."""
