"""The network: a small LeNet-style CNN for 28x28 MNIST digits (45,226 parameters)."""

import torch
import torch.nn.functional as F
from torch import nn


class MNISTNet(nn.Module):
    """Two conv blocks extract a 16x4x4 feature map; three linear layers classify it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=5)  # 28x28 -> 24x24, pooled to 12x12
        self.conv2 = nn.Conv2d(8, 16, kernel_size=5)  # 12x12 -> 8x8, pooled to 4x4
        self.fc1 = nn.Linear(16 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)
        # He initialisation suits ReLU layers: the signal keeps its scale through the stack, so
        # training moves from the first step. PyTorch's default init draws weights with about
        # 0.41x He's standard deviation (1/sqrt(6)), so the signal shrinks layer by layer and
        # small learning rates such as --lr=1e-3 start slowly.
        for layer in (self.conv1, self.conv2, self.fc1, self.fc2, self.fc3):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def get_features(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened convolutional feature map, shape (N, 256): what the projector shows."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape (N, 10); softmax is left to the loss."""
        x = self.get_features(x)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
