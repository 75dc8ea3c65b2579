"""Live-batch state that must survive a resize of the batch, checked against `generate` alone."""

from test_continuous import ASKS, assert_alone, run_live
from test_generate import images

import palitorch

from hf_factory import diverse


def test_a_repetition_penalty_remembers_its_tokens_across_resizes(ckpt_factory):
    """A penalised sequence's seen tokens (its prompt and answer so far) move with it when the batch grows and shrinks
    around it: each answer is still `generate`'s alone. Arrivals at steps 0, 4, 8 and 9 into 3 rows: the batch grows
    from 1 row while the first sequence has answered, and shrinks as the others end."""
    pipe = palitorch.load(diverse(ckpt_factory, 1)[0])
    imgs, prompts = images(4), ASKS[:4]
    opts = {"max_new_tokens": 24, "min_new_tokens": 24, "repetition_penalty": 3.0}
    plain = pipe.generate(imgs[0], prompts[0], max_new_tokens=24, min_new_tokens=24)
    assert pipe.generate(imgs[0], prompts[0], **opts).token_ids != plain.token_ids  # the penalty matters here
    got, _, log = run_live(pipe, imgs, prompts, [0, 4, 8, 9], max_rows=3, **opts)
    assert log["rows"][0] == 1 and max(log["rows"]) > 1, log["rows"]
    assert_alone(pipe, imgs, prompts, got, **opts)


def test_a_sequence_near_the_end_of_the_context_ends_there_as_alone(ckpt_factory):
    """A prompt 3 tokens short of the model's context leaves room for 3 tokens in a live batch too: its answer is
    `generate`'s (3 tokens, "length"), not max_new_tokens past the RoPE table."""
    from test_generate_edges import prompt_of

    pipe = palitorch.load(diverse(ckpt_factory, 1)[0])
    context = pipe.cfg.text.max_position_embeddings
    imgs, prompts = images(2), [prompt_of(pipe, context - 3), "caption en"]
    got, _, _ = run_live(pipe, imgs, prompts, [0, 0], max_rows=2, max_new_tokens=10)
    assert len(got[0].token_ids) == 3 and got[0].finish_reason == "length"
    assert_alone(pipe, imgs, prompts, got, max_new_tokens=10)


def test_a_sequence_that_lives_through_two_moves_keeps_its_oldest_slots(ckpt_factory):
    """Slot bookkeeping across moves: a move re-bases every live sequence's start, and the next move reads those
    starts. Four requests with the same prompt (so only budgets move slots): X (8 tokens) from step 0; A (50 tokens)
    from step 3, so A starts at slot 3; X ends; B arrives at step 10 with a budget one past the cache's end, which
    moves the slots in use left by 3 (A now starts at 0); C arrives at step 12 with such a budget too, and must wait,
    since A's slots start at 0 and nothing can move left. Bookkeeping that forgot A's new start would move left by 3
    again for C and lose A's oldest slots (its first image tokens). Every answer is `generate`'s alone."""
    pipe = palitorch.load(diverse(ckpt_factory, 1)[0])
    imgs, prompt = images(4), ASKS[0]
    arrivals, budgets = [0, 3, 10, 12], [8, 50, None, None]  # None: one past the cache's end, known when it arrives
    results, admitted, moves_while_a = {}, {}, 0
    with pipe.live(max_rows=3) as live:
        real_move = live._move

        def move(slot):
            nonlocal moves_while_a
            moves_while_a += slot != live.cur.slot and 1 in admitted and 1 not in results
            real_move(slot)

        live._move = move
        waiting, step = [0, 1, 2, 3], 0
        while waiting or live.active:
            for i in [i for i in waiting if arrivals[i] <= step]:
                if budgets[i] is None:
                    budgets[i] = live.s_len - live.cur.slot + 1
                got = live.admit([imgs[i]], [prompt], tags=[i], options=[{"max_new_tokens": budgets[i]}])
                if got is not None:
                    waiting.remove(i)
                    admitted[i] = step
                    results.update({q.tag: r for q, r in got[1] if not isinstance(r, str)})
            results.update({q.tag: r for q, r in live.step() if not isinstance(r, str)})
            step += 1
    assert admitted[2] == 10 and admitted[3] > 12 and moves_while_a >= 1, (admitted, moves_while_a)
    for i in range(4):
        want = pipe.generate(imgs[i], prompt, max_new_tokens=budgets[i])
        assert (results[i].token_ids, results[i].text) == (want.token_ids, want.text), i
