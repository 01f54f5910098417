"""The training helpers behind the default model (`python -m bench.train_default`): the routers'
load is counted and balanced as DeepSeek-V3 does."""

import torch

from hybrid import training
from hybrid.default_model import SHAPE


def test_router_loads_count_every_routed_slot_and_balance_against_the_load():
    model = training.hf_model(training.model_config(SHAPE), seed=1).eval()
    loads = training.RouterLoads(model)
    ids = torch.arange(40)[None]
    with torch.no_grad():
        model(input_ids=ids)
    counts = loads.counts.clone()
    assert (counts.sum(1) == ids.numel() * model.config.num_experts_per_tok).all()
    before = [r.e_score_correction_bias.clone() for r in loads.routers]
    loads.balance(1e-3)
    for router, load, bias in zip(loads.routers, counts, before):
        step = router.e_score_correction_bias - bias
        assert (step[load > load.mean()] < 0).all() and (step[load < load.mean()] > 0).all()
    assert loads.counts.sum() == 0
    loads.remove()
