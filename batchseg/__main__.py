"""`python -m batchseg`; the guard matters because Dask spawns worker processes."""
from batchseg.cli import main

if __name__ == "__main__":
    main()
