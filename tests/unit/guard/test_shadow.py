import pytest
import torch

from guard import HiddenStateCapture
from guard.shadow import ShadowScorer
from tests.conftest import build_tiny_model
from tests.helpers import fitted_probe


def full_model_scores(model, probe, ids):
    with HiddenStateCapture(model, probe.hook_name) as cache:
        model(torch.tensor([ids]))
    return probe.score_tensor(cache[probe.hook_name][0]).tolist()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("source", ["from_model", "from_pretrained"])
def test_incremental_shadow_scores_equal_full_forward(tmp_path, tiny_tokenizer, model_type, source):
    model = build_tiny_model(model_type, len(tiny_tokenizer), n_layers=4)
    probe = fitted_probe(32, hook="blocks.-3.hook_resid_post")  # layer 1 of 4
    if source == "from_model":
        scorer = ShadowScorer.from_model(model, probe)
    else:
        model.save_pretrained(tmp_path)
        scorer = ShadowScorer.from_pretrained(tmp_path, probe, n_layers=4)
    assert len(scorer.model.model.layers) == 2  # layers after the probed one never run
    ids = tiny_tokenizer.encode("Sure, here is how to do it: step one, step two")
    expected = full_model_scores(model, probe, ids)
    session = scorer.session()
    got = session.feed(ids[:5])  # prompt
    for token in ids[5:]:  # then one generated token at a time
        got += session.feed([token])
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=1e-4)


def test_rewind_then_feed_matches_fresh_sequence(tiny_tokenizer):
    model = build_tiny_model("llama", len(tiny_tokenizer), n_layers=3)
    probe = fitted_probe(32, hook="blocks.-1.hook_resid_post")
    scorer = ShadowScorer.from_model(model, probe)
    a = tiny_tokenizer.encode("step one, step two")
    b = tiny_tokenizer.encode(" The end.")
    session = scorer.session()
    session.feed(a + tiny_tokenizer.encode(" Sure, here is"))
    session.rewind(len(tiny_tokenizer.encode(" Sure, here is")))
    assert session.length == len(a)
    torch.testing.assert_close(
        torch.tensor(session.feed(b)),
        torch.tensor(full_model_scores(model, probe, a + b)[len(a) :]),
        atol=1e-5,
        rtol=1e-4,
    )


def assert_scores_close(got, expected, atol=1e-5, rtol=1e-4):
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=atol, rtol=rtol)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_batched_feeds_equal_unbatched_sessions(tiny_tokenizer, model_type):
    """Several sessions of different lengths, fed together in changing subsets (one joins
    late, one skips a round, one rolls back, two take a recovery text together), score
    exactly as the same feeds given to each session alone."""
    model = build_tiny_model(model_type, len(tiny_tokenizer), n_layers=4)
    probe = fitted_probe(32, hook="blocks.-3.hook_resid_post")
    scorer = ShadowScorer.from_model(model, probe)
    texts = [
        "Sure, here is how to do it: step one",
        "I'm sorry",
        "The quick brown fox jumps over the lazy dog 0123456789",
        "Here is a helpful answer to your question.",
    ]
    prompts = [tiny_tokenizer.encode(t) for t in texts]
    continuation = tiny_tokenizer.encode(" step two, step three. The end. Sure, here is how")
    recovery = tiny_tokenizer.encode(" I can't help")
    batched = [scorer.session() for _ in prompts]
    alone = [scorer.session() for _ in prompts]
    got: list[list[float]] = [[] for _ in prompts]
    want: list[list[float]] = [[] for _ in prompts]

    def feed(rows: list[int], tokens: list[list[int]]) -> None:
        outs = scorer.feed_batch([batched[r] for r in rows], tokens)
        for r, t, out in zip(rows, tokens, outs):
            got[r] += out
            want[r] += alone[r].feed(t)

    for r in (0, 1, 2):  # prompts of different lengths, each alone
        feed([r], [prompts[r]])
    for step, token in enumerate(continuation):
        if step == 3:
            feed([3], [prompts[3]])  # a request joins mid-way
        rows = [r for r in range(4) if (step > 3 or r != 3) and not (r == 1 and step == 5)]
        feed(rows, [[(token + 7 * r) % len(tiny_tokenizer)] for r in rows])
        if step == 6:  # request 2 rolls back 4 tokens, then 0 and 2 get a recovery text
            batched[2].rewind(4)
            alone[2].rewind(4)
            feed([0, 2], [recovery, recovery])
    assert [s.length for s in batched] == [s.length for s in alone]
    for r in range(4):
        assert len(got[r]) == len(want[r])
        # Tight: a tiny random model's scores all sit near 0.5, so a wrong position or
        # mask moves them by only ~5e-5.
        assert_scores_close(got[r], want[r], atol=2e-6, rtol=0)
    # And "alone" is the model itself: the full forward of the sequence session 0 was fed.
    seq0 = prompts[0] + continuation[:7] + recovery + continuation[7:]
    assert_scores_close(got[0], full_model_scores(model, probe, seq0))


def test_ragged_batched_feeds_equal_unbatched_sessions(tiny_tokenizer):
    """Sessions feeding different numbers of tokens in one pass (a lagging stream's backlog
    next to single tokens, an empty feed, a new session) score as each fed alone."""
    model = build_tiny_model("llama", len(tiny_tokenizer), n_layers=3)
    probe = fitted_probe(32, hook="blocks.-2.hook_resid_post")
    scorer = ShadowScorer.from_model(model, probe)
    prompts = [tiny_tokenizer.encode(t) for t in ("Sure, here is", "I'm sorry, no", "Hi")]
    batched = [scorer.session() for _ in range(4)]
    alone = [scorer.session() for _ in range(4)]
    rounds = [
        prompts + [[]],
        [[11, 12, 13, 14, 15], [16], [], tiny_tokenizer.encode("A new one")],
        [[17], [18, 19, 20], [21, 22], [23]],
    ]
    for feeds in rounds:
        outs = scorer.feed_batch(batched, feeds)
        for session, tokens, out in zip(alone, feeds, outs, strict=True):
            assert len(out) == len(tokens)
            assert_scores_close(out, session.feed(tokens) if tokens else [], atol=2e-6, rtol=0)
    assert [s.length for s in batched] == [s.length for s in alone]


def test_feed_batch_rejects_repeated_or_missing_feeds(tiny_tokenizer):
    model = build_tiny_model("llama", len(tiny_tokenizer), n_layers=2)
    scorer = ShadowScorer.from_model(model, fitted_probe(32, hook="blocks.-1.hook_resid_post"))
    a, b = scorer.session(), scorer.session()
    with pytest.raises(ValueError, match="one token list per session"):
        scorer.feed_batch([a, b], [[10]])
    with pytest.raises(ValueError, match="twice"):
        scorer.feed_batch([a, a], [[10], [11]])
    with pytest.raises(ValueError, match="rewind"):
        a.rewind(1)


def test_a_bf16_shadow_scores_within_the_plugin_parity_tolerance(tmp_path, tiny_tokenizer):
    # The in-engine plugin scores a bf16 vLLM against the fp32 reference with this tolerance
    # (tests/integration/vllm_plugin): |dp| < 0.05 or |d logit| < 0.5 per token.
    model = build_tiny_model("llama", len(tiny_tokenizer), n_layers=4)
    probe = fitted_probe(32, hook="blocks.-3.hook_resid_post")
    model.save_pretrained(tmp_path)
    scorer = ShadowScorer.from_pretrained(tmp_path, probe, n_layers=4, dtype=torch.bfloat16)
    assert next(scorer.model.parameters()).dtype == torch.bfloat16
    ids = tiny_tokenizer.encode("Sure, here is how to do it: step one, step two")
    expected = torch.tensor(full_model_scores(model, probe, ids))
    session = scorer.session()
    got = session.feed(ids[:5])
    for token in ids[5:]:
        got += session.feed([token])
    got = torch.tensor(got)
    assert got.dtype == torch.float32 and len(got) == len(expected)
    dp = (got - expected).abs()
    dlogit = (torch.logit(got, eps=1e-6) - torch.logit(expected, eps=1e-6)).abs()
    assert bool(((dp < 0.05) | (dlogit < 0.5)).all()), (dp.max(), dlogit.max())


def test_a_checkpoint_without_the_probed_layers_is_refused(tmp_path, tiny_tokenizer):
    from guard.errors import ModelNotFoundError

    model = build_tiny_model("llama", len(tiny_tokenizer), n_layers=2)
    model.save_pretrained(tmp_path)
    probe = fitted_probe(32, hook="blocks.2.hook_resid_post")  # layer 2: not in the file
    with pytest.raises(ModelNotFoundError, match="missing"):
        ShadowScorer.from_pretrained(tmp_path, probe, n_layers=4)
