"""Classifiers and mask networks used by both papers.

Every model takes inputs in [0, 1] and applies no normalisation (the convention of Madry et al.
and TRADES), so every epsilon in this project is in pixel units.

  smallcnn         the MNIST classifier of the calibrated paper's release (README.md, Calibrated
                   adversarial training)
  preact_resnet18  PreAct ResNet-18 (He et al. 2016), calibrated paper Tables 2 and 4
  wrn34_10         WideResNet-34-10, dropout 0 (Madry et al., TRADES), both papers
  vgg16            VGG-16 with BatchNorm, global pooling, Linear(512 -> classes), customized Table 3

Mask networks g_phi of the calibrated paper (Eq. 11), called as mask_net(x, delta):
  small     MNIST: conv(64, s2) - conv(128) - conv(128) - upsample - conv(C) - sigmoid
  resnet18  CIFAR: ResNet-18 trunk to 512 x H/8 x W/8 - nearest upsample - conv3x3(C) - sigmoid
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallCNN(nn.Module):
    """Four 3x3 convs (two with stride 2), ReLU after each, then Linear(-> 100) - ReLU - Linear."""

    def __init__(self, num_classes=10, in_channels=1, image_size=28):
        super().__init__()
        conv = lambda i, o, s: [nn.Conv2d(i, o, 3, stride=s, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*conv(in_channels, 32, 1), *conv(32, 32, 2),
                                      *conv(32, 64, 1), *conv(64, 64, 2), nn.Flatten())
        side = (image_size + 3) // 4  # two stride-2 convs with padding 1: 28 -> 14 -> 7
        self.classifier = nn.Sequential(nn.Linear(64 * side * side, 100), nn.ReLU(),
                                        nn.Linear(100, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class PreActBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        layers, in_planes = [], 64
        for planes, stride in [(64, 1), (64, 1), (128, 2), (128, 1),
                               (256, 2), (256, 1), (512, 2), (512, 1)]:
            layers.append(PreActBlock(in_planes, planes, stride))
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideResNet(nn.Module):
    """WRN-depth-widen (Zagoruyko & Komodakis 2016) as used by Madry et al. and TRADES; with
    dropout 0 its block is the pre-activation block."""

    def __init__(self, depth=34, widen_factor=10, num_classes=10, in_channels=3):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers, in_planes = [], widths[0]
        for planes, stride in [(widths[1], 1), (widths[2], 2), (widths[3], 2)]:
            for i in range(n):
                layers.append(PreActBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class VGG16(nn.Module):
    """VGG-16 with BatchNorm; global average pooling before Linear(512 -> classes)."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
        layers, c = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))  # ceil: 28 x 28 inputs work too
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class SmallMaskNet(nn.Module):
    """g_phi for MNIST (calibrated paper, Appendix C as released). Reads x + delta."""

    def __init__(self, in_channels=1):
        super().__init__()
        act = lambda: nn.LeakyReLU(0.2)
        self.body = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 2, 1), act(),
                                  nn.Conv2d(64, 128, 3, 1, 1), act(),
                                  nn.Conv2d(128, 128, 3, 1, 1), act())
        self.head = nn.Conv2d(128, in_channels, 3, 1, 1)

    def forward(self, x, delta):
        h = F.interpolate(self.body(x + delta), size=delta.shape[-2:], mode="nearest")
        return torch.sigmoid(self.head(h))


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18MaskNet(nn.Module):
    """g_phi for CIFAR (calibrated paper, Appendix C as released). Reads x + delta."""

    def __init__(self, in_channels=3):
        super().__init__()
        layers, in_planes = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
                             nn.BatchNorm2d(64), nn.ReLU()], 64
        for planes, stride in [(64, 1), (64, 1), (128, 2), (128, 1),
                               (256, 2), (256, 1), (512, 2), (512, 1)]:
            layers.append(BasicBlock(in_planes, planes, stride))
            in_planes = planes
        self.trunk = nn.Sequential(*layers)  # 32 x 32 -> 512 x 4 x 4
        self.head = nn.Conv2d(512, in_channels, 3, 1, 1)

    def forward(self, x, delta):
        h = F.interpolate(self.trunk(x + delta), size=delta.shape[-2:], mode="nearest")
        return torch.sigmoid(self.head(h))


ARCHS = ("smallcnn", "preact_resnet18", "wrn34_10", "vgg16")
MASK_NETS = ("small", "resnet18")


def get_model(arch, num_classes=10, in_channels=3, image_size=32):
    """Build a classifier by name, so that a checkpoint can record the name."""
    if arch == "smallcnn":
        return SmallCNN(num_classes, in_channels, image_size)
    if arch == "preact_resnet18":
        return PreActResNet18(num_classes, in_channels)
    if arch == "wrn34_10":
        return WideResNet(34, 10, num_classes, in_channels)
    if arch == "vgg16":
        return VGG16(num_classes, in_channels)
    raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")


def get_mask_net(name, in_channels=3):
    """Build a mask network g_phi by name: 'small' (MNIST) or 'resnet18' (CIFAR)."""
    if name == "small":
        return SmallMaskNet(in_channels)
    if name == "resnet18":
        return ResNet18MaskNet(in_channels)
    raise ValueError(f"unknown mask net {name!r}; valid: {', '.join(MASK_NETS)}")
