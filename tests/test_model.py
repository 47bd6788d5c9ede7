import torch

from models import MNISTNet


def test_shapes_and_parameter_count():
    net = MNISTNet()
    images = torch.randn(5, 1, 28, 28)
    assert net(images).shape == (5, 10)
    assert net.get_features(images).shape == (5, 256)
    assert sum(p.numel() for p in net.parameters()) == 45_226


def test_forward_is_the_classifier_on_top_of_get_features():
    torch.manual_seed(0)
    net = MNISTNet()
    images = torch.randn(3, 1, 28, 28)
    features = net.get_features(images)
    logits = net.fc3(torch.relu(net.fc2(torch.relu(net.fc1(features)))))
    torch.testing.assert_close(net(images), logits)


def test_feature_map_is_16x4x4_flattened():
    net = MNISTNet()
    images = torch.randn(2, 1, 28, 28)
    pooled = torch.nn.functional.max_pool2d(torch.relu(net.conv1(images)), 2)
    pooled = torch.nn.functional.max_pool2d(torch.relu(net.conv2(pooled)), 2)
    assert pooled.shape == (2, 16, 4, 4)
    torch.testing.assert_close(net.get_features(images), pooled.flatten(1))
