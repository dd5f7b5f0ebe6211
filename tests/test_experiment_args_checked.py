"""Training arguments every node would refuse are refused by the experiment before any task is sent.

Before: with no num_updates/epochs every node failed its task ("neither 'num_updates' nor 'epochs' is set"),
and Scaffold with momentum or weight decay was refused by every node, each costing a round and a node wait."""

from __future__ import annotations

import numpy as np
import pytest
from e2e_support import TESTS
from plans_lsq import LinearPlan

from fedcore.accountant import MiniBatchTrainingIterationsAccountant
from fedcore.aggregators import FedAverage, Scaffold
from fedcore.aggregators.scaffold import check_plain_sgd_args
from fedcore.errors import ExperimentError, TrainingArgsError
from fedcore.training_args import TrainingArgs
from fedserver.cli import main
from fedserver.experiment import Experiment

PLAN = f"{TESTS / 'plans_lsq.py'}:LinearPlan"


def test_no_iteration_count_is_refused_naming_the_arguments(tmp_path) -> None:
    with pytest.raises(ExperimentError, match=r"training_args: neither 'num_updates' nor 'epochs' is set"):
        Experiment(LinearPlan, {"lr": 0.1}, rounds=1)


@pytest.mark.parametrize("args", [{"num_updates": 3}, {"epochs": 1}, {"dry_run": True}])
def test_any_iteration_count_is_accepted(args) -> None:
    assert Experiment(LinearPlan, args, rounds=1).training_args["lr"] > 0


@pytest.mark.parametrize("extra, named", [({"momentum": 0.9}, "momentum=0.9"),
                                          ({"weight_decay": 0.01}, "weight_decay=0.01"),
                                          ({"momentum": 0.5, "weight_decay": 0.1}, "momentum=0.5, weight_decay=0.1")])
def test_scaffold_refuses_what_its_maths_does_not_describe(extra, named) -> None:
    with pytest.raises(ExperimentError, match=rf"training_args: Scaffold's control variates assume plain SGD: "
                                              rf"{named} must be 0"):
        Experiment(LinearPlan, {"num_updates": 3, **extra}, aggregator=Scaffold(), rounds=1)
    # FedAvg averages whatever the optimizer did
    Experiment(LinearPlan, {"num_updates": 3, **extra}, aggregator=FedAverage(), rounds=1)


def test_node_and_server_share_the_scaffold_rule() -> None:
    check_plain_sgd_args(TrainingArgs(num_updates=1))
    with pytest.raises(TrainingArgsError, match="momentum=0.9 must be 0"):
        check_plain_sgd_args(TrainingArgs(num_updates=1, momentum=0.9))


def test_the_accountant_says_the_same() -> None:
    class Plan:
        training_data_loader = [np.zeros(1)] * 4
        training_args = TrainingArgs(lr=0.1)

    with pytest.raises(TrainingArgsError, match="neither 'num_updates' nor 'epochs' is set"):
        MiniBatchTrainingIterationsAccountant(Plan())


def test_cli_run_refuses_before_waiting_for_nodes(capsys, tmp_path) -> None:
    assert main(["--home", str(tmp_path / "home"), "nodes", "enroll", "site-0", "--quiet"]) == 0
    capsys.readouterr()
    status = main(["--home", str(tmp_path / "home"), "run", "--plan", PLAN, "--rounds", "1", "--tls", "insecure",
                   "--port", "0", "--aggregator", "scaffold", "--args", '{"num_updates": 2, "momentum": 0.9}'])
    err = capsys.readouterr().err
    assert status in (1, 2) and "momentum=0.9 must be 0" in err, err
