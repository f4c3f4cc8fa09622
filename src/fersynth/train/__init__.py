"""Training: timm backbones (models), data and sampling (data), MEK losses (losses), loop."""
