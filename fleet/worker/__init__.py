"""`fleet worker`: the processes of one host. `main` starts and supervises
them (`children`, `heartbeat`); each consumer process (`consumer`) runs tasks
with the `runner`, which decides an attempt's `outcome` (pure) and records
its `output`; `running` is the table of the tasks it runs, `holdback` whether
it takes tasks, `housekeeping` its leases and the tasks others left behind."""
