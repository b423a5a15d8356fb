"""What the scheduler and the executor share, owned by neither service.

`pagedserve.v1`: the protobuf and gRPC stubs generated from protos/pagedserve/**/*.proto;
`pagedserve.contract`: the executor contract (step plans and results, their codec and validation, the
executor-side sequence state); and the utilities both services use (errors, settings,
default_model, gc_policy, metrics_http, grpc_decoding). Nothing here imports scheduler_svc or
executor_svc.
"""
