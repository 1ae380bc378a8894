"""The MoT world model: causality rules by perturbation, expert routing, sizes, RoPE, and learning."""

import pytest
import torch

from lingbot.config import PRESETS, preset
from lingbot.model.world_model import (
    WorldModel,
    apply_rope,
    attention_mask,
    count_parameters,
    draw_noise,
    flow_matching_loss,
    rope_angles,
)

B, N, C, Z, H, W, K, A = 1, 4, 2, 4, 4, 4, 4, 4


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = WorldModel(preset("tiny").model, cameras=C, actions_per_chunk=K)
    for head in (model.video_out, model.action_out, model.state_in):  # zero-initialised: would hide every effect
        torch.nn.init.normal_(head.weight, std=0.5)
    return model.eval()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "noisy_video": torch.randn(B, N, C, Z, H, W, generator=g),
        "clean_video": torch.randn(B, N, C, Z, H, W, generator=g),
        "noisy_action": torch.randn(B, N, K, 16, generator=g),
        "clean_action": torch.randn(B, N, K, 16, generator=g),
        "t_video": torch.rand(B, N, generator=g),
        "t_action": torch.rand(B, N, generator=g),
        "t_history": torch.zeros(B, N),
        "text": torch.randn(B, 1, 384, generator=g),
        "state": torch.randn(B, N, 16, generator=g),
    }


def changed_chunks(model, x, key, chunk):
    """Which chunks' (video, action) predictions change when `key` of chunk `chunk` is perturbed."""
    with torch.no_grad():
        v0, a0 = model(**x)
        y = dict(x)
        y[key] = x[key].clone()
        y[key][:, chunk] += 1.0
        v1, a1 = model(**y)
    dv = [(v1[:, k] - v0[:, k]).abs().max().item() > 1e-6 for k in range(N)]
    da = [(a1[:, k] - a0[:, k]).abs().max().item() > 1e-6 for k in range(N)]
    return dv, da


@pytest.mark.parametrize("j", [0, 1, 2])
def test_clean_video_of_chunk_j_reaches_only_later_video_and_its_own_actions(j):
    dv, da = changed_chunks(tiny_model(), inputs(), "clean_video", j)
    assert dv == [k > j for k in range(N)]  # noisy video k sees clean video < k
    assert da == [k >= j for k in range(N)]  # noisy action k decodes from clean video <= k


@pytest.mark.parametrize("j", [0, 1, 2])
def test_clean_actions_of_chunk_j_reach_only_later_chunks(j):
    dv, da = changed_chunks(tiny_model(), inputs(), "clean_action", j)
    assert dv == [k > j for k in range(N)]
    assert da == [k > j for k in range(N)]


@pytest.mark.parametrize("j", [0, 1, 2])
def test_state_of_chunk_j_reaches_its_own_actions_and_later_chunks(j):
    dv, da = changed_chunks(tiny_model(), inputs(), "state", j)
    assert dv == [k > j for k in range(N)]  # through the clean action history of chunk j
    assert da == [k >= j for k in range(N)]


def keypoint_model():
    import dataclasses

    torch.manual_seed(0)
    model = WorldModel(dataclasses.replace(preset("tiny").model, keypoints=8), cameras=C, actions_per_chunk=K)
    for head in (model.video_out, model.action_out, model.state_in, model.keypoints_v, model.keypoints_a):
        torch.nn.init.normal_(head.weight, std=0.5)
    return model.eval()


@pytest.mark.parametrize("j", [0, 1, 2])
def test_keypoints_of_the_frame_a_chunk_starts_from_reach_only_that_chunks_predictions(j):
    """They enter the noisy tokens of their chunk only: the clean history (the KV cache) is as without them."""
    x = inputs() | {"observed": torch.randn(B, N, C, Z, H, W, generator=torch.Generator().manual_seed(3))}
    dv, da = changed_chunks(keypoint_model(), x, "observed", j)
    assert dv == [k == j for k in range(N)] and da == [k == j for k in range(N)]
    with pytest.raises(ValueError, match="pass observed"):
        keypoint_model()(**inputs())
    assert tiny_model().keypoint_net is None  # off by default: no parameters, bundles before it load


def test_training_reads_keypoints_from_the_previous_chunks_latent_and_trains_them():
    model, batch = keypoint_model().train(), _loss_batch()
    noise = draw_noise(batch, model.cfg.action_channels, 3.0, 0.0, torch.Generator().manual_seed(0))
    flow_matching_loss(model, batch, noise, A)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.keypoint_net.parameters())
    seen = []
    hook = model.keypoint_net.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        flow_matching_loss(model, batch, noise, A)
    hook.remove()
    video = batch["video"]
    assert torch.equal(seen[0], torch.cat([video[:, :1], video[:, :-1]], 1))  # chunk k reads latent k - 1


def ablation_model(**change):
    import dataclasses

    model = tiny_model()
    model.cfg = dataclasses.replace(model.cfg, **change)
    return model


@pytest.mark.parametrize("j", [0, 1, 2])
def test_bidirectional_history_attends_both_ways(j):
    """The paper's bidirectional ablation: a clean history chunk reaches earlier chunks' predictions
    through the clean tokens they attend to (causal: only later ones); the noisy rules are unchanged."""
    dv, da = changed_chunks(ablation_model(attention="bidirectional"), inputs(), "clean_video", j)
    assert dv == [k >= 1 for k in range(N)]  # every chunk with an earlier clean block, whichever j moved
    assert da == [True] * N


def test_bidirectional_last_chunk_truth_is_unseen_and_alone_trained():
    """The last chunk's teacher-forced clean video and actions reach no prediction but its own actions
    (inverse dynamics, as at run time), and the loss is the last chunk's alone: the earlier chunks'
    predictions had the future in their history, so they are not targets."""
    model, last = ablation_model(attention="bidirectional"), N - 1
    dv, da = changed_chunks(model, inputs(), "clean_video", last)
    assert dv == [False] * N and da == [k == last for k in range(N)]
    dv, da = changed_chunks(model, inputs(), "clean_action", last)
    assert dv == da == [False] * N
    batch = _loss_batch()
    noise = draw_noise(batch, 16, 3.0, 0.0, torch.Generator().manual_seed(0))
    moved = dict(noise, eps_video=noise["eps_video"].clone(), eps_action=noise["eps_action"].clone())
    moved["eps_video"][:, : last], moved["eps_action"][:, : last] = 5.0, 5.0  # only earlier chunks' noise
    with torch.no_grad():
        for m, same in ((model, True), (tiny_model(), False)):  # the causal model trains every chunk
            a, b = flow_matching_loss(m, batch, noise, A), flow_matching_loss(m, batch, moved, A)
            assert (torch.equal(a["loss"], b["loss"])) is same


@pytest.mark.parametrize("j", [0, 1, 2])
def test_without_video_prediction_actions_skip_their_own_chunks_video(j):
    model = ablation_model(video_prediction=False)
    dv, da = changed_chunks(model, inputs(), "clean_video", j)
    assert da == [k > j for k in range(N)]  # history only: clean video < k
    dv, da = changed_chunks(model, inputs(), "noisy_video", j)
    assert da == [False] * N  # nothing the actions read depends on imagined video
    batch = _loss_batch()
    noise = draw_noise(batch, 16, 3.0, 0.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = flow_matching_loss(model, batch, noise, A)
    assert out["loss"] == out["action"] and out["video"] > 0  # reported, not trained


@pytest.mark.parametrize("j", [0, 1, 2])
def test_an_imagined_future_stands_in_for_its_chunks_video_where_its_actions_read_it(j):
    """Chunk j's imagined copy reaches only chunk j's actions; its recorded video then reaches later chunks only."""
    x = inputs() | {"imagined": torch.randn(B, N, C, Z, H, W, generator=torch.Generator().manual_seed(4))}
    dv, da = changed_chunks(tiny_model(), x, "imagined", j)
    assert dv == [False] * N and da == [k == j for k in range(N)]
    dv, da = changed_chunks(tiny_model(), x, "clean_video", j)
    assert dv == [k > j for k in range(N)] and da == [k > j for k in range(N)]


def test_an_imagined_future_equal_to_the_recorded_one_changes_nothing():
    """The imagined copy sees what the recorded video of its chunk sees: given the same frames, the same outputs."""
    model, x = tiny_model(), inputs()
    with torch.no_grad():
        v0, a0 = model(**x)
        v1, a1 = model(**x, imagined=x["clean_video"])
    torch.testing.assert_close(v1, v0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a1, a0, atol=1e-5, rtol=1e-5)


def test_imagined_futures_replace_the_recorded_video_in_the_drawn_rows_only():
    from lingbot.model.world_model import imagine_futures, pad_channels

    model, batch = tiny_model(), _loss_batch()
    off = draw_noise(batch, model.cfg.action_channels, 3.0, 0.5, torch.Generator().manual_seed(0))
    on = draw_noise(batch, model.cfg.action_channels, 3.0, 0.5, torch.Generator().manual_seed(0), imagined_future_p=1.0)
    assert "imagined_future" not in off and all(torch.equal(off[k], on[k]) for k in off)  # drawn last
    assert on["imagined_future"].all()
    none = dict(on, imagined_future=torch.zeros(2, dtype=torch.bool))
    with torch.no_grad():
        assert torch.allclose(flow_matching_loss(model, batch, none, A)["loss"],
                              flow_matching_loss(model, batch, off, A)["loss"], atol=1e-6)
        assert flow_matching_loss(model, batch, on, A)["action"] != flow_matching_loss(model, batch, off, A)["action"]
        video, actions = batch["video"], pad_channels(batch["actions"], 16, "action")
        args = (video, video, actions, actions, on["t_video"], on["t_action"], torch.zeros(2, N), batch["task"],
                pad_channels(batch["start_state"], 16, "state"), None)
        rows = dict(on, imagined_future=torch.tensor([True, False]))
        imagined = imagine_futures(model, args, rows)
    assert torch.equal(imagined[1], video[1]) and not torch.allclose(imagined[0], video[0])
    with pytest.raises(ValueError, match="needs a model that imagines video"):
        imagine_futures(ablation_model(video_prediction=False), args, rows)


def test_the_causal_default_mask_is_the_documented_rules():
    g = torch.Generator().manual_seed(0)
    block, clean = torch.randint(0, 8, (40,), generator=g), torch.rand(40, generator=g) < 0.5
    bq, bk, cq, ck = block[:, None], block[None, :], clean[:, None], clean[None, :]
    rules = (cq & ck & (bk <= bq)) | (~cq & ck & (bk < bq)) | (~cq & ~ck & (bk == bq))
    assert torch.equal(attention_mask(block, clean), rules)
    assert torch.equal(attention_mask(block, clean, 2), rules & ((bq // 2 - bk // 2) < 2))


def test_pad_channels_puts_the_robot_first_and_refuses_too_many():
    from lingbot.model.world_model import pad_channels

    state = torch.arange(6.0).view(1, 3, 2)
    assert pad_channels(state, 4, "state")[0, 1].tolist() == [2, 3, 0, 0]
    with pytest.raises(ValueError, match="3 channels, the model only 2"):
        pad_channels(torch.zeros(1, 2, 3), 2, "state")


def _loss_batch(seed=1, n=N):
    g = torch.Generator().manual_seed(seed)
    return {
        "video": torch.randn(2, n, C, Z, H, W, generator=g),
        "actions": torch.rand(2, n, K, A, generator=g) * 2 - 1,
        "action_mask": torch.ones(2, n, K, dtype=torch.bool),  # a window starting mid-episode
        "task": torch.randn(2, 1, 384, generator=g),
        "start_state": torch.randn(2, n, A, generator=g),
    }


def test_first_chunk_of_a_window_is_context_only():
    """Its noisy video sees no clean block and mid-episode its actions lack their start frame: no target."""
    model, batch = tiny_model(), _loss_batch()
    noise = draw_noise(batch, model.cfg.action_channels, 3.0, 0.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = flow_matching_loss(model, batch, noise, A)
        for key in ("eps_video", "eps_action"):
            moved = dict(noise)
            moved[key] = noise[key].clone()
            moved[key][:, 0] += 3.0
            out = flow_matching_loss(model, batch, moved, A)
            assert out["video"] == base["video"] and out["action"] == base["action"], key
            moved[key][:, 1] += 3.0  # a later chunk is a target
            assert flow_matching_loss(model, batch, moved, A)["loss"] != base["loss"], key
    with pytest.raises(ValueError, match="at least 2 chunks"):
        flow_matching_loss(model, _loss_batch(n=1), draw_noise(_loss_batch(n=1), 16, 3.0, 0.0), A)


def test_per_chunk_history_noise_levels_each_chunk_and_is_off_by_default():
    model, batch = tiny_model(), _loss_batch()
    off = draw_noise(batch, model.cfg.action_channels, 3.0, 0.5, torch.Generator().manual_seed(0))
    on = draw_noise(batch, model.cfg.action_channels, 3.0, 0.5, torch.Generator().manual_seed(0), 1.0, 1.0)
    assert all(torch.equal(off[k], on[k]) for k in off if k != "chunk_history")  # drawn after the rest
    assert not off["chunk_history"].any()
    levels = on["chunk_history"]
    assert levels.shape == (2, N) and (levels.std(dim=1) > 0).all() and levels.max() <= 1.0
    without = {k: v for k, v in off.items() if k != "chunk_history"}
    with torch.no_grad():  # off: exactly the per-sample augmentation alone
        assert flow_matching_loss(model, batch, off, A)["loss"] == flow_matching_loss(model, batch, without, A)["loss"]
        assert flow_matching_loss(model, batch, on, A)["loss"] != flow_matching_loss(model, batch, off, A)["loss"]


def test_history_action_dropout_hides_a_chunks_actions_from_later_chunks_only():
    """Chunk 0 is context only: its actions reach the loss only as history. With dropout 1 they are
    hidden, so changing them changes nothing; off, they count, and the draws of the rest do not move."""
    model, batch = tiny_model(), _loss_batch()
    moved = dict(batch, actions=batch["actions"].clone())
    moved["actions"][:, 0] = -batch["actions"][:, 0]
    off = draw_noise(batch, model.cfg.action_channels, 3.0, 0.5, torch.Generator().manual_seed(0))
    on = draw_noise(batch, model.cfg.action_channels, 3.0, 0.5, torch.Generator().manual_seed(0),
                    action_history_dropout=1.0)
    assert "action_history_keep" not in off and all(torch.equal(off[k], on[k]) for k in off)
    assert not on["action_history_keep"].any()
    half = draw_noise(_loss_batch(n=12), 16, 3.0, 0.5, torch.Generator().manual_seed(0), action_history_dropout=0.5)
    assert 0 < half["action_history_keep"].float().mean() < 1
    with torch.no_grad():
        assert flow_matching_loss(model, moved, on, A)["loss"] == flow_matching_loss(model, batch, on, A)["loss"]
        assert flow_matching_loss(model, moved, off, A)["loss"] != flow_matching_loss(model, batch, off, A)["loss"]


def test_padding_action_channels_are_zero_in_training_and_sampling():
    """The robot uses A of the model's 16 action channels: the rest must look alike when trained and sampled."""
    from lingbot.model.world_model import KVCache
    from lingbot.config import PolicyConfig
    from lingbot.policy.denoise import chunk_noise, denoise_chunk, write_history

    model, batch = tiny_model(), _loss_batch()
    seen = []
    hook = model.action_in.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    noise = draw_noise(batch, model.cfg.action_channels, 3.0, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        flow_matching_loss(model, batch, noise, A)
    assert seen and all(x[..., A:].abs().max() == 0 for x in seen)  # noisy and clean copies
    assert seen[0][..., :A].abs().max() > 0

    seen.clear()
    g = torch.Generator().manual_seed(0)
    text = model.encode_text(torch.randn(1, 1, 384, generator=g))
    cache = KVCache(model.cfg.depth)
    with torch.no_grad():
        executed = torch.zeros(1, K, 16)
        write_history(model, cache, 0, text, torch.randn(1, C, Z, H, W, generator=g), executed, 0,
                      state=torch.zeros(1, 16))
        x, a, _ = chunk_noise(g, (C, Z, H, W), K, 16, "cpu")
        cfg = PolicyConfig(video_steps=2, video_exec_step=2, action_steps=4, history_chunks=0)
        actions, _ = denoise_chunk(model, cache, 1, text, x, a, cfg, torch.zeros(1, 16), action_dim=A)
    hook.remove()
    sampled = seen[1:]  # after the history write: one noisy action input per action step
    assert len(sampled) == cfg.action_steps
    assert all(x[..., A:].abs().max() == 0 and x[..., :A].abs().max() > 0 for x in sampled)
    assert (actions[:, A:] == 0).all()


@pytest.mark.parametrize("key, stream", [("noisy_video", 0), ("noisy_action", 1)])
def test_noisy_tokens_see_only_their_own_block(key, stream):
    j = 2
    dv, da = changed_chunks(tiny_model(), inputs(), key, j)
    own = [k == j for k in range(N)]
    assert (dv, da) == ((own, [False] * N) if stream == 0 else ([False] * N, own))


def test_attention_window_is_by_chunk_video_and_actions_together():
    # Blocks 2k (video) and 2k+1 (actions) of chunks 0..5, two tokens each. With a 2-chunk window the
    # video of chunk 5 sees chunks 4 and 5 whole, and never the actions of chunk 3 without their video
    # (a block window of 4 would have shown block 7 but not block 6: a pattern no training window holds).
    block = torch.arange(12).repeat_interleave(2)
    clean = torch.ones(24, dtype=torch.bool)
    full, windowed = attention_mask(block, clean), attention_mask(block, clean, window_chunks=2)
    video5 = (block == 10).nonzero()[0, 0]
    seen = set(block[windowed[video5]].tolist())
    assert full[video5, 0] and seen == {8, 9, 10}
    actions5 = (block == 11).nonzero()[0, 0]
    assert set(block[windowed[actions5]].tolist()) == {8, 9, 10, 11}


def test_video_tokens_only_touch_video_expert_weights_and_back():
    model = tiny_model()
    x = inputs()
    n_video, n_action = 2 * N * C * (H // 2) * (W // 2), 2 * N * K
    seen = {}

    def hook(name):
        def fn(module, args, out):
            seen.setdefault(name, set()).add(args[0].shape[1])
        return fn

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (".video." in name or ".action." in name) and "cross" not in name:
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        model(**x)
    assert seen
    for name, lengths in seen.items():
        expected = n_video if ".video." in name else n_action
        assert lengths == {expected}, (name, lengths)


def test_paper_preset_parameter_count():
    with torch.device("meta"):
        model = WorldModel(PRESETS["paper"].model, cameras=2)
    counts = count_parameters(model)
    assert 4.8e9 < counts["video"] < 5.2e9  # Wan2.2-5B's transformer
    assert 3.2e8 < counts["action"] < 3.8e8  # the paper's ~350M action expert
    with torch.device("meta"):
        tiny = WorldModel(PRESETS["tiny"].model, cameras=2)
    assert count_parameters(tiny)["total"] < 1_000_000


def test_rope_scores_depend_only_on_relative_time():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 2, 32), torch.randn(1, 1, 2, 32)
    pos = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 1.0]])
    shifted = pos + torch.tensor([5.0, 0.0, 0.0])

    def score(p):
        a = rope_angles(p, 32)
        return (apply_rope(q, a)[..., 0, :] * apply_rope(k, a)[..., 1, :]).sum()

    assert torch.allclose(score(pos), score(shifted), atol=1e-4)
    assert not torch.allclose(score(pos), score(pos * torch.tensor([2.0, 1.0, 1.0])), atol=1e-3)


def test_loss_decreases_on_a_tiny_overfit_batch():
    torch.manual_seed(0)
    model = WorldModel(preset("tiny").model, cameras=C, actions_per_chunk=K)
    g = torch.Generator().manual_seed(1)
    batch = {
        "video": torch.randn(2, N, C, Z, H, W, generator=g),
        "actions": torch.rand(2, N, K, A, generator=g) * 2 - 1,
        "action_mask": torch.ones(2, N, K, dtype=torch.bool),
        "task": torch.randn(2, 1, 384, generator=g),
        "start_state": torch.randn(2, N, A, generator=g),
    }
    batch["action_mask"][:, 0] = False
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(150):
        noise = draw_noise(batch, model.cfg.action_channels, 3.0, 0.5, torch.Generator().manual_seed(step % 4))
        out = flow_matching_loss(model, batch, noise, A)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10


def test_the_task_text_reaches_the_queries():
    """One pooled text token: cross-attention's softmax over one key is 1, so it adds the same vector to
    every token and its q/k get no gradient. Through AdaLN the text moves the first layer's queries."""
    model = tiny_model()
    x = inputs()
    batch = {"video": x["clean_video"], "actions": x["clean_action"][..., :A], "task": x["text"],
             "action_mask": torch.ones(B, N, K, dtype=torch.bool), "start_state": x["state"]}
    noise = draw_noise(batch, 16, 3.0, 0.0, torch.Generator().manual_seed(0))
    flow_matching_loss(model.train(), batch, noise, A)["loss"].backward()
    cross = model.layers[0].video.cross
    assert cross.to_q.weight.grad.abs().max() < 1e-6  # the old path: nothing but rounding
    for table in (model.text_mod_v, model.text_mod_a):  # zero at init, trained from the first step
        assert table.weight.grad.abs().max() > 0
    queries = []
    model.layers[0].video.to_q.register_forward_hook(lambda m, args, out: queries.append(out))
    torch.nn.init.normal_(model.text_mod_v.weight, std=0.5)
    with torch.no_grad():
        model.eval()(**x)
        model(**{**x, "text": torch.randn(B, 1, 384, generator=torch.Generator().manual_seed(9))})
    assert (queries[0] - queries[1]).abs().max() > 1e-3


def test_the_action_loss_does_not_move_with_the_window_length():
    """Divided by the target chunks' slots: the same per-slot error gives the same loss at n = 2 and 4."""
    from lingbot.config import ModelConfig

    torch.manual_seed(0)
    model = WorldModel(ModelConfig(**{**preset("tiny").model.__dict__, "state_channels": 0}), cameras=C,
                       actions_per_chunk=K)
    losses = []
    for n in (2, 4):
        batch = {"video": torch.zeros(B, n, C, Z, H, W), "actions": torch.zeros(B, n, K, A),
                 "action_mask": torch.ones(B, n, K, dtype=torch.bool), "task": torch.zeros(B, 1, 384),
                 "start_state": torch.zeros(B, n, 4)}
        noise = draw_noise(batch, 16, 3.0, 0.0, torch.Generator().manual_seed(0))
        noise["eps_action"] = torch.ones_like(noise["eps_action"])  # zero-headed model: error = eps = 1
        with torch.no_grad():
            losses.append(flow_matching_loss(model, batch, noise, A)["action"].item())
    assert losses[0] == pytest.approx(1.0) and losses[1] == pytest.approx(1.0)


@pytest.mark.parametrize("steps,shift", [(6, 3.0), (10, 3.0), (4, 1.0), (17, 5.0)])
def test_the_sampler_is_diffusers_flow_matching_euler_scheduler(steps, shift):
    """FlowSampler's times are training's shifted schedule (shift * u / (1 + (shift - 1) u) over evenly
    spaced u), and its Euler steps give diffusers' FlowMatchEulerDiscreteScheduler's samples bit for bit;
    padding channels stay 0 throughout."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from lingbot.model.world_model import FlowSampler

    sampler = FlowSampler(steps, shift, live=3)
    u = torch.linspace(1.0, 0.0, steps + 1)
    assert torch.equal(sampler.times, shift * u / (1 + (shift - 1) * u))
    assert sampler.level(0) == 1.0 and sampler.level(steps) == 0.0
    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    reference.set_timesteps(sigmas=u[:-1].tolist())
    g = torch.Generator().manual_seed(0)
    x = ours = sampler.start(torch.randn(2, 5, generator=g))
    velocities = [torch.randn(2, 5, generator=g) for _ in range(steps)]
    for i, t in enumerate(reference.timesteps):
        v = torch.cat([velocities[i][:, :3], torch.zeros(2, 2)], dim=-1)  # the model predicts 0 on padding
        ours = sampler.step(ours, velocities[i], i)
        x = reference.step(v, t, x).prev_sample
        assert torch.equal(ours, x) and not ours[:, 3:].any()
