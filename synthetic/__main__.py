"""`python -m synthetic --root DIR [--seed 0] [--scale 1.0]`: the same as `python -m synthetic.world`."""
from synthetic.world import main

if __name__ == '__main__':
    main()
