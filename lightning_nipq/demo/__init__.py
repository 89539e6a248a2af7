"""The demo: float training, NIPQ to 3 bits, and HardQuantize, on digits or Fashion-MNIST."""
