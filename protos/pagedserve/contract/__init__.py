"""The executor contract, shared by the scheduler and the executor and owned by neither.

`plan` holds the StepPlan / StepResult dataclasses that mirror pagedserve.v1's executor.proto;
`plan_codec` converts them to and from protobuf at the gRPC boundary; `plan_validation` holds the
checks an executor applies to every plan before it runs one; `sequence_registry` holds the
executor-side state of each sequence a plan names (settings, token history, block table), which every
backend shares. Nothing here imports scheduler_svc or executor_svc, and nothing here imports torch.
"""
