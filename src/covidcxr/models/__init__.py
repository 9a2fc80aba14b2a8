"""Networks: the backbone registry with typed pretrained configs, the classifier, pretrained weights, the U-Net."""
