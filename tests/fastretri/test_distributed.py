import torch

from common.distributed import all_gather_by_index, get_rank, get_world_size, is_main_process
from fastretri.data import GlobalBatchSampler
from fastretri.train import get_args_parser, main


def test_rank_helpers_without_process_group():
    assert (get_rank(), get_world_size(), is_main_process()) == (0, 1, True)


def test_all_gather_by_index_single_process_reorders():
    feats = torch.arange(6.0).reshape(3, 2)
    out = all_gather_by_index(feats, torch.tensor([2, 0, 1]), 3)
    assert torch.equal(out, torch.tensor([[2.0, 3.0], [4.0, 5.0], [0.0, 1.0]]))


def test_global_batches_are_split_across_ranks():
    one = list(GlobalBatchSampler(50, 8, seed=3))
    two = [list(GlobalBatchSampler(50, 8, r, 2, seed=3)) for r in range(2)]
    assert len(one) == 6 and all(len(b) == 8 for b in one)
    assert [a + b for a, b in zip(*two)] == one  # rank 0 then rank 1 = the global batch


def _run(config, data, procs, extra):
    args = get_args_parser().parse_args(["--config-file", str(config), "--data_path", str(data), "--num-gpus", "0",
                                         "--num-procs", str(procs), *extra])
    main(args)


def test_two_gloo_processes_equal_one(tiny_config, tiny_data, tmp_path, monkeypatch):
    """Same global batches, deterministic inputs: 2-process DDP (gloo) = 1 process up to float rounding."""
    extra = ["INPUT.CROP.ENABLED", "False", "INPUT.FLIP.ENABLED", "False", "INPUT.CJ.ENABLED", "False",
             "SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "9", "SOLVER.BASE_LR", "0.05"]
    states = []
    for procs in (1, 2):
        monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / f"p{procs}"))
        _run(tiny_config, tiny_data, procs, extra)
        ckpt = tmp_path / f"p{procs}" / "fastretri" / "cub_uncropped_resnet18_checkpoint.pth"
        states.append(torch.load(ckpt, weights_only=True)["model"])
    one, two = states
    torch.manual_seed(0)
    from fastretri.model import FastRetri
    init = FastRetri(4, "resnet18").state_dict()
    moved = max((one[k].float() - init[k].float()).abs().max().item() for k in one)
    diff = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
    assert moved > 1e-3, "training did not change the weights; the comparison would be vacuous"
    assert diff < 1e-5, diff
    # the BNNeck used the statistics of the global batch in both runs
    assert torch.allclose(one["bottleneck.running_mean"], two["bottleneck.running_mean"], atol=1e-6)
