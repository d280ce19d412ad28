"""How a user's images are read (`disco train --recipe`), apart from the loaders so that `--help` and option
checks read it without importing torch.

"small" resizes to one size and nothing else (28x28 to 64x64 images of a small dataset, where a crop would cut
the object); "photo" is the standard ImageNet recipe (training: a random resized crop and a horizontal flip;
evaluation and deployment: the shorter side resized to size / CROP_FRACTION, then the centre cropped; ImageNet's
mean and std); "auto" picks "photo" when the first training image's shorter side is at least PHOTO_SIDE pixels.
"""
RECIPES = ("auto", "small", "photo")
PHOTO_SIDE, PHOTO_SIZE, CROP_FRACTION = 128, 224, 0.875
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = [0.449], [0.226]  # torchvision's grey-scale equivalents
