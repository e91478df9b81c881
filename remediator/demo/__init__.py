"""Local stand-ins and the simulated service that `remediator demo` runs."""
