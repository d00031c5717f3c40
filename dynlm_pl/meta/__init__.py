"""The medium time scale: dynamic weights θ_t, the update rules that change them while reading (sgd, Krause's rms,
the learned gates of g_φ), scoring a stream with them, meta-training's unrolled inner loop, and tuning baselines.

Modules, bottom up: `weights` (which parameters adapt, the flat layout), `rules` (one class per update rule),
`learner` (the meta-learner g_φ), `scoring` (static and adaptive evaluation), `unroll` (meta-training's inner
loop), `tuning` (grid and pattern search of the hand-designed rules).
"""
