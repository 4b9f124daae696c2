// Shared device helpers for the cupysyncbn kernels (filled in by the CUDA path).
#pragma once
