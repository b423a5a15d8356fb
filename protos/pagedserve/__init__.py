"""PagedServe's gRPC API: the protobuf and gRPC stubs generated from protos/pagedserve/**/*.proto."""
