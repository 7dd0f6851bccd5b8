"""torch.library registrations (fake implementations, autograd) of each hot path's ops."""
