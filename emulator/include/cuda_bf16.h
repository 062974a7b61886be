// <cuda_bf16.h> of the host build: see rk_emu_half.h.
#pragma once
#include "rk_emu_half.h"
