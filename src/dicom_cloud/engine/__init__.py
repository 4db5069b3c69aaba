"""The transfer engine's parts (the map is in docs/ARCHITECTURE.md); ``dicom_cloud.transfer`` puts
them together and is the module the rest of the code imports."""
