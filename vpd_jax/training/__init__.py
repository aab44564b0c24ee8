"""Training: SiLog losses (``losses``), LR schedules (``schedules``), AdamW parameter groups (``optimizer``),
and the train state with the sharded, jitted step (``step``). Mesh and sharding rules live in
``vpd_jax.parallel``.
"""
