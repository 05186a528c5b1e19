"""The paged runner's fast path (helpers/course/paged_llama.py): q/k/v and gate/up as one matmul each of their
stacked weights, the rotary cos/sin read from a table, the forward under torch.inference_mode. It must give the
numbers of the layers' own modules (the path it takes when a projection is not a plain nn.Linear), notice a weight
changed after it stacked the weights, and hand back logits a caller may change in place."""
import copy

import pytest
import torch

from helpers.claims import max_abs_diff, tolerance
from helpers.course import tiny_llama
from helpers.course.paged_llama import PagedLlamaRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["Four score and seven years ago", "We hold these truths", "A famished Fox"]


@pytest.fixture(scope="module")
def model():
    return tiny_llama.load_model()


def _step_logits(runner: PagedLlamaRunner) -> list[torch.Tensor]:
    """A mixed step (two prompts whole, one in a chunk), then three batched decode steps: every step's logits."""
    ids = [tiny_llama.encode(p) for p in PROMPTS]
    for i, p in enumerate(ids):
        runner.allocate(i, p + [0] * 8)
    out = [runner.forward_batch([(0, ids[0], 0), (1, ids[1], 0), (2, ids[2][:5], 0)], all_logits=True)]
    out.append(runner.forward_batch([(2, ids[2][5:], 5)]))
    lengths = [len(p) for p in ids]
    for _ in range(3):
        last = out[-1]
        batch = [(i, [int(last[min(i, len(last) - 1)].argmax())], lengths[i]) for i in range(3)]
        out.append(runner.forward_batch(batch))
        lengths = [n + 1 for n in lengths]
    return out


def test_fused_projections_give_the_modules_numbers(model):
    fast = PagedLlamaRunner(model, num_blocks=16, block_size=8)
    hooked = copy.deepcopy(model)
    for layer in hooked.model.layers:                     # a hook: the runner must call the modules one by one
        layer.self_attn.q_proj.register_forward_hook(lambda module, args, out: None)
    slow = PagedLlamaRunner(hooked, num_blocks=16, block_size=8)
    got, want = _step_logits(fast), _step_logits(slow)
    assert all(slow._fused_cache[i][2] is None for i in range(len(hooked.model.layers)))
    assert all(fast._fused_cache[i][2] is not None for i in range(len(model.model.layers)))
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert max_abs_diff(g, w) <= tolerance(w, torch.float32), max_abs_diff(g, w)
    assert [g.argmax(-1).tolist() for g in got] == [w.argmax(-1).tolist() for w in want]


def test_a_weight_changed_in_place_is_seen(model):
    changed = copy.deepcopy(model)
    runner = PagedLlamaRunner(changed, num_blocks=16, block_size=8)
    before = _step_logits(runner)[0]
    with torch.no_grad():
        changed.model.layers[1].mlp.up_proj.weight.mul_(0.5)        # after the runner stacked gate and up
        changed.model.layers[2].self_attn.k_proj.weight.mul_(0.5)   # and q, k, v
    after = _step_logits(PagedLlamaRunner(changed, num_blocks=16, block_size=8))[0]
    runner.manager = PagedLlamaRunner(changed, num_blocks=16, block_size=8).manager   # same runner, empty pool
    again = _step_logits(runner)[0]
    assert max_abs_diff(before, after) > 100 * tolerance(after, torch.float32)      # the change matters
    assert torch.equal(again, after)


def test_logits_are_ordinary_tensors(model):
    runner = PagedLlamaRunner(model, num_blocks=16, block_size=8)
    logits = _step_logits(runner)[-1]
    assert not logits.is_inference()
    logits += 1.0                                        # an inference tensor would raise here
