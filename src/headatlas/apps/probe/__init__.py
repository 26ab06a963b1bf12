"""Per-head probes with control tasks (Hewitt & Liang 2019; :mod:`.probing`): a linear probe on
every head's output, its selectivity over a control task, and the columns it writes into an atlas."""
