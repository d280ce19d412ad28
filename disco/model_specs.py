"""What `--model` takes (built by disco/models.py): one text for every command's help and the training
config's, in a module without torch so that `--help` answers at once."""

MODEL_SPECS = ("torchvision:NAME (e.g. torchvision:resnet50), timm:NAME (e.g. timm:resnet18), hf:MODEL_TYPE "
               "(transformers, e.g. hf:vit) or hf:FOLDER (a save_pretrained folder), disco:NAME or "
               "path/to/file.py:factory")
