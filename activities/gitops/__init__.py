"""GitOps activities: find the suspect change and manage rollback pull requests."""
