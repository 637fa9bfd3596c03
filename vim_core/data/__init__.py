"""Datasets: sources (embedded MNIST, image folders, tar shards; local or s3) and npz shards."""
