"""The repository root, for tests that start the CLIs as subprocesses (cwd) or read files beside the code."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
