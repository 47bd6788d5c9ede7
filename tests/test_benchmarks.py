"""The benchmarks read what train_mnist.py writes today, so that their figures can be measured again."""

import pytest
import torch

from conftest import QUICK_VALIDATED, REPO, train_in_process


def test_the_report_reads_the_validation_accuracy_that_chose_the_best_epoch(tmp_path, synthetic_data,
                                                                           monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import report

    run_dir = train_in_process(synthetic_data, tmp_path, "run", *QUICK_VALIDATED, "--epochs", "2")
    history = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["history"]
    curve = report.accuracy_curve(run_dir)
    assert [point.step for point in curve] == [record["step"] for record in history]
    assert [point.value for point in curve] == pytest.approx([record["validation_accuracy"]
                                                              for record in history])
