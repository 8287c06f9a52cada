"""rtsmap models: MViTv2 backbone, modality fusion, Cascade Mask R-CNN, training and ONNX export.

Submodules are imported explicitly (``from models.backbone import MultimodalBackbone``) so that
importing the package stays cheap.
"""
