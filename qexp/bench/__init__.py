"""Training cost of every method, measured the same way, side by side: ``python -m qexp.bench``.

Two scales: the embedded model end to end (``--scale model``), and one linear layer at the
papers' shapes (``--scale layer``; Llama-3-8B's 4096×4096, 4096×14336, 14336×4096). For each
method: train step time (forward + backward + optimizer), peak memory, merged-model eval
throughput and setup time, with ratios to LoRA on the same model in the same run. The
results go to ``results/bench/bench.{json,md}``. How each number is taken, why targets are
missed, and each optimization made with its predicted and measured effect: :mod:`.report`
(``HOW``, ``NOTES``), printed in every ``bench.md``.

Layout: :mod:`.cli` (options, the interleaved timing rounds), :mod:`.worker` (one method's setup,
memory and merge in a fresh process), :mod:`.measure` (clocks, memory meters), :mod:`.report`.
"""
