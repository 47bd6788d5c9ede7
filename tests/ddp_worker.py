"""Run train_mnist.py under torchrun, and also keep each process's final weights.

    torchrun ... tests/ddp_worker.py WEIGHTS_DIR [train_mnist.py flags]

Only process 0 writes checkpoints, so the tests use this to compare the weights that every
process ends with. test() is called by every process after each epoch on the model being
trained (the first model it sees), whose weights are then kept; the final test of the weights
validation chose is on another network.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_mnist

weights_dir = Path(sys.argv[1])
real_test = train_mnist.test


trained = []


def test_and_keep_weights(model, loader):
    if not trained:
        trained.append(model)
    if model is trained[0]:
        torch.save(model.state_dict(), weights_dir / f"rank{train_mnist.RANK}.pt")
    return real_test(model, loader)


train_mnist.test = test_and_keep_weights
sys.exit(train_mnist.main(sys.argv[2:]))
