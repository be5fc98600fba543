// The CUDA emulation of kvtier_cuda_emu.h under the real header's name.
#include "kvtier_cuda_emu.h"
