"""PagedServe scheduler: admission, FCFS iteration-level scheduling, preemption, block tables.

The core (config, sampling_params, sequence, block_allocator, block_manager, scheduler) is plain
synchronous Python with no torch and no I/O.
"""
