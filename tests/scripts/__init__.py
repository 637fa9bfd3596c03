"""Scripts the tests run by path (`python tests/scripts/x.py`, torchrun). Python puts a script's folder first
on sys.path; here that folder holds no vim_core/ or flows/ test package to shadow the real ones."""
