"""Train and eval transforms: data2vec's pretraining augmentation, resize + centre-crop for eval."""
from __future__ import annotations

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = T.InterpolationMode.BICUBIC


def train_transform(image_size: int = 224, scale=(0.08, 1.0), auto_augment: str | None = None,
                    random_erasing: float = 0.0, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """RandomResizedCrop(bicubic) + horizontal flip + normalise: the augmentation the student was
    pretrained with. ``auto_augment`` / ``random_erasing`` switch to timm's ImageNet train transform
    (RandAugment, random erasing), which data2vec's own fine-tuning uses."""
    if auto_augment or random_erasing:
        from timm.data import create_transform

        return create_transform(
            input_size=image_size, is_training=True, scale=tuple(scale), auto_augment=auto_augment,
            interpolation="bicubic", re_prob=random_erasing, re_mode="pixel", re_count=1, mean=mean, std=std,
        )
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def eval_transform(image_size: int = 224, crop_ratio: float = 0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize the shorter side to image_size / crop_ratio (bicubic), centre-crop image_size, normalise."""
    return T.Compose([
        T.Resize(int(image_size / crop_ratio), interpolation=BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
