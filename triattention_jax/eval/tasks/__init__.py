"""Evaluation tasks scored against a known answer: the inputs they build and how they score.

Running them through the decode path and storing results is `triattention_jax.evaluation`'s job.
"""
