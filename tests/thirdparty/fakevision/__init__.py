"""A stand-in for torchvision.models' calling conventions (the library never imports torchvision)."""
