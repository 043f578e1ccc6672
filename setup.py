"""Installs perceiver_jax: the Perceiver and Perceiver IO in JAX/Haiku."""

import setuptools

setuptools.setup(
    name='perceiver_jax',
    version='0.1.0',
    description=(
        'Perceiver (Jaegle et al. 2021) training framework on JAX, Haiku, '
        'optax and jaxline.'),
    packages=setuptools.find_packages(
        include=['perceiver_jax', 'perceiver_jax.*', 'experiments',
                 'experiments.*', 'configs', 'configs.*', 'scripts',
                 'scripts.*']),
    python_requires='>=3.11',
    install_requires=[
        'jax>=0.10',
        'jaxlib>=0.10',
        'dm-haiku>=0.0.13',
        'optax>=0.2.4',
        'jaxline>=0.0.8',
        'ml-collections>=0.1.1',
        'tensorflow-cpu>=2.16',
        'tensorflow-datasets>=4.9.6',
        'importlib_resources>=6.0',
        'tensorboard>=2.16',
        'orbax-checkpoint>=0.11',
        'numpy>=1.26',
        'scikit-learn>=1.4',
        'h5py>=3.10',
        # scripts/attention_maps.py and scripts/paper_table.py draw figures.
        'pillow>=10.0',
        'matplotlib>=3.8',
    ],
    package_data={'perceiver_jax.backends.cpu': ['csrc/*.cc', 'csrc/*.h'],
                  'perceiver_jax.data': ['imagenet2012_labels.txt']},
    extras_require={
        # OpenBLAS for the CPU backend's kernels, compiled at first use with
        # the host's C++ compiler; without either, CPU runs the reference ops.
        'cpu': ['scipy-openblas32>=0.3.27'],
        'cuda': ['jax[cuda12]>=0.10'],
        'tpu': ['jax[tpu]>=0.10'],
        # gcp-storage-emulator and gcsfs: the gs:// tests' local GCS
        # (tests/gcs_emulator.py).
        'test': ['pytest>=8.0', 'pytest-xdist>=3.5', 'scikit-image>=0.22',
                 'av>=12.0', 'scipy-openblas32>=0.3.27',
                 'gcp-storage-emulator>=2024.8', 'gcsfs>=2024.6'],
        'audio': ['av>=12.0'],
        # scripts/benchmark.py --compare=hf. From PyPI torch brings CUDA
        # packages; its CPU wheel: --index-url https://download.pytorch.org/whl/cpu
        'compare': ['torch>=2.1', 'transformers>=4.40'],
    },
    entry_points={
        'console_scripts': [
            'perceiver-train=scripts.train:run',
            'perceiver-evaluate=scripts.evaluate:run',
        ],
    },
)
