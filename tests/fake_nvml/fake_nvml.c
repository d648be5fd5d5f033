/* A fake NVIDIA management library for meterage's tests: the NVML entry points meterage
 * uses, over scripted devices, plus fake_nvml_* functions the tests call (through ctypes,
 * on the same loaded library) to add devices, move counters and inject NVML errors.
 *
 * Built by the test suite with the system C compiler; loaded by meterage through
 * METERAGE_NVML_LIBRARY. Signatures and struct layouts follow nvml.h.
 *
 * For a whole program (the demo, in a subprocess) FAKE_NVML_DEVICES=N makes nvmlInit add N
 * "live" devices when none were scripted: their energy counters advance with the clock at
 * their power draw, updating every FAKE_NVML_ENERGY_PERIOD_MS (default 50) like real ones. */

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int nvmlReturn_t;
typedef struct fake_device *nvmlDevice_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
};

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
    unsigned int gpu, memory;
} nvmlUtilization_t;

typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;
#define NVML_MEMORY_V2 ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2 << 24)))
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25
/* What the driver keeps for itself: in "used" of the v1 query, apart in v2. */
#define RESERVED_BYTES (256ULL << 20)

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
#ifdef FAKE_NVML_R535
    /* Drivers 535.43-535.86 write this too, from the same _v3 entry point. */
    unsigned long long usedGpuCcProtectedMemory;
#endif
} nvmlProcessInfo_t;

typedef struct {
    unsigned int pid;
    unsigned long long timeStamp;
    unsigned int smUtil, memUtil, encUtil, decUtil;
} nvmlProcessUtilizationSample_t;

#define MAX_DEVICES 8
#define MAX_PROCESSES 64
#define MAX_SAMPLES 64
#define MAX_FAILURES 32
#define ALL_DEVICES 0xFFFFFFFFu

struct fake_device {
    int live; /* energy follows the clock */
    char name[64], uuid[80];
    unsigned long long energy_mj, memory_total, memory_used;
    unsigned int power_mw, utilization_gpu, utilization_memory, encoder, decoder, temperature;
    nvmlProcessInfo_t processes[MAX_PROCESSES];
    unsigned int process_count;
    nvmlProcessUtilizationSample_t samples[MAX_SAMPLES];
    unsigned int sample_count;
};

struct failure {
    char function[64];
    unsigned int device;
    nvmlReturn_t code;
};

struct call_count {
    char function[64];
    unsigned long long calls;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct fake_device devices[MAX_DEVICES];
static unsigned int device_count;
static struct failure failures[MAX_FAILURES];
static struct call_count calls[64];
static int initialised;
static char driver_version[32] = "550.54.15";
static struct timespec live_since;
static long long live_period_ms = 50;

static long long elapsed_ms(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - live_since.tv_sec) * 1000LL + (now.tv_nsec - live_since.tv_nsec) / 1000000;
}

/* N live devices from FAKE_NVML_DEVICES, when the tests scripted none. */
static void add_live_devices(void) {
    const char *wanted = getenv("FAKE_NVML_DEVICES");
    if (wanted == NULL || device_count != 0) return;
    const char *period = getenv("FAKE_NVML_ENERGY_PERIOD_MS");
    if (period != NULL && atoll(period) > 0) live_period_ms = atoll(period);
    clock_gettime(CLOCK_MONOTONIC, &live_since);
    for (int i = 0; i < atoi(wanted) && device_count < MAX_DEVICES; i++) {
        struct fake_device *d = &devices[device_count++];
        memset(d, 0, sizeof *d);
        d->live = 1;
        snprintf(d->name, sizeof d->name, "NVIDIA Fake Live %d", i);
        snprintf(d->uuid, sizeof d->uuid, "GPU-fake-live-%d", i);
        d->memory_total = 16ULL << 30;
        d->memory_used = 1ULL << 30;
        d->power_mw = 75000 + 25000 * (unsigned int)i;
        d->utilization_gpu = 20;
        d->temperature = 45;
    }
}

static void count_call(const char *function) {
    for (unsigned i = 0; i < sizeof calls / sizeof calls[0]; i++) {
        if (calls[i].function[0] == 0) {
            snprintf(calls[i].function, sizeof calls[i].function, "%s", function);
        }
        if (strcmp(calls[i].function, function) == 0) {
            calls[i].calls++;
            return;
        }
    }
}

/* The injected error for `function` on device `index` (0: none). */
static nvmlReturn_t injected(const char *function, unsigned int index) {
    for (unsigned i = 0; i < MAX_FAILURES; i++) {
        const struct failure *f = &failures[i];
        if (f->code != 0 && strcmp(f->function, function) == 0 &&
            (f->device == ALL_DEVICES || f->device == index)) {
            return f->code;
        }
    }
    return NVML_SUCCESS;
}

/* Common entry: count the call, check initialisation, the handle and injected errors. */
static nvmlReturn_t enter(const char *function, nvmlDevice_t device) {
    count_call(function);
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    unsigned int index = ALL_DEVICES;
    if (device != NULL) {
        if (device < devices || device >= devices + device_count) {
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        index = (unsigned int)(device - devices);
    }
    return injected(function, index);
}

#define ENTER(device)                                   \
    pthread_mutex_lock(&lock);                          \
    nvmlReturn_t status = enter(__func__, (device));    \
    if (status != NVML_SUCCESS) {                       \
        pthread_mutex_unlock(&lock);                    \
        return status;                                  \
    }
static nvmlReturn_t leave(nvmlReturn_t code) {
    pthread_mutex_unlock(&lock);
    return code;
}

/* ---- the NVML entry points ------------------------------------------------------------- */

nvmlReturn_t nvmlInit_v2(void) {
    pthread_mutex_lock(&lock);
    count_call(__func__);
    nvmlReturn_t code = injected(__func__, ALL_DEVICES);
    if (code == NVML_SUCCESS) {
        initialised++;
        add_live_devices();
    }
    return leave(code);
}

nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&lock);
    count_call(__func__);
    if (initialised > 0) initialised--;
    return leave(NVML_SUCCESS);
}

const char *nvmlErrorString(nvmlReturn_t code) {
    switch (code) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 9: return "Driver Not Loaded";
    case 15: return "GPU is lost";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    ENTER(NULL);
    snprintf(version, length, "%s", driver_version);
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    ENTER(NULL);
    *count = device_count;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    pthread_mutex_lock(&lock);
    count_call(__func__);
    if (!initialised) return leave(NVML_ERROR_UNINITIALIZED);
    if (index >= device_count) return leave(NVML_ERROR_INVALID_ARGUMENT);
    nvmlReturn_t code = injected(__func__, index);
    if (code == NVML_SUCCESS) *device = &devices[index];
    return leave(code);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    ENTER(device);
    snprintf(name, length, "%s", device->name);
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    ENTER(device);
    snprintf(uuid, length, "%s", device->uuid);
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long *mj) {
    ENTER(device);
    *mj = device->energy_mj;
    if (device->live) {
        long long updated_ms = elapsed_ms() / live_period_ms * live_period_ms;
        *mj += (unsigned long long)updated_ms * device->power_mw / 1000;
    }
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *mw) {
    ENTER(device);
    *mw = device->power_mw;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    ENTER(device);
    memory->total = device->memory_total;
    memory->used = device->memory_used + RESERVED_BYTES;
    memory->free = device->memory_total - memory->used;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    ENTER(device);
    if (memory->version != NVML_MEMORY_V2) return leave(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    memory->total = device->memory_total;
    memory->reserved = RESERVED_BYTES;
    memory->used = device->memory_used;
    memory->free = device->memory_total - device->memory_used - RESERVED_BYTES;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *rates) {
    ENTER(device);
    rates->gpu = device->utilization_gpu;
    rates->memory = device->utilization_memory;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetEncoderUtilization(nvmlDevice_t device, unsigned int *percent,
                                             unsigned int *period_us) {
    ENTER(device);
    *percent = device->encoder;
    *period_us = 167000;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetDecoderUtilization(nvmlDevice_t device, unsigned int *percent,
                                             unsigned int *period_us) {
    ENTER(device);
    *percent = device->decoder;
    *period_us = 167000;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensor, unsigned int *celsius) {
    ENTER(device);
    if (sensor != 0) return leave(NVML_ERROR_INVALID_ARGUMENT);
    *celsius = device->temperature;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                     nvmlProcessInfo_t *infos) {
    ENTER(device);
    unsigned int have = device->process_count;
    if (infos == NULL || *count < have) {
        *count = have;
        return leave(have == 0 ? NVML_SUCCESS : NVML_ERROR_INSUFFICIENT_SIZE);
    }
    memcpy(infos, device->processes, have * sizeof *infos);
    *count = have;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t device,
                                             nvmlProcessUtilizationSample_t *samples,
                                             unsigned int *count,
                                             unsigned long long last_seen) {
    ENTER(device);
    unsigned int newer = 0;
    for (unsigned i = 0; i < device->sample_count; i++) {
        if (device->samples[i].timeStamp > last_seen) newer++;
    }
    if (newer == 0) {
        *count = 0;
        return leave(NVML_ERROR_NOT_FOUND);
    }
    if (samples == NULL || *count < newer) {
        *count = newer;
        return leave(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    unsigned int out = 0;
    for (unsigned i = 0; i < device->sample_count; i++) {
        if (device->samples[i].timeStamp > last_seen) samples[out++] = device->samples[i];
    }
    *count = out;
    return leave(NVML_SUCCESS);
}

#ifdef FAKE_NVML_R535
/* Present on the R535 drivers whose _v3 process entries are 32 bytes. */
nvmlReturn_t nvmlDeviceGetConfComputeMemSizeInfo(nvmlDevice_t device, void *info) {
    (void)info;
    ENTER(device);
    return leave(3); /* Not Supported */
}
#endif

/* ---- the tests' controls ---------------------------------------------------------------- */

#define DEVICE(index)                               \
    pthread_mutex_lock(&lock);                      \
    if ((index) >= device_count) {                  \
        pthread_mutex_unlock(&lock);                \
        return -1;                                  \
    }                                               \
    struct fake_device *d = &devices[(index)]

#define DONE                      \
    pthread_mutex_unlock(&lock);  \
    return 0

/* No devices, no injected errors, no call counts (initialisation is kept). */
void fake_nvml_reset(void) {
    pthread_mutex_lock(&lock);
    memset(devices, 0, sizeof devices);
    memset(failures, 0, sizeof failures);
    memset(calls, 0, sizeof calls);
    device_count = 0;
    snprintf(driver_version, sizeof driver_version, "%s", "550.54.15");
    pthread_mutex_unlock(&lock);
}

/* Adds a device; returns its index (-1 when full). */
int fake_nvml_add_device(const char *name, const char *uuid, unsigned long long memory_total) {
    pthread_mutex_lock(&lock);
    if (device_count == MAX_DEVICES) {
        pthread_mutex_unlock(&lock);
        return -1;
    }
    struct fake_device *d = &devices[device_count];
    memset(d, 0, sizeof *d);
    snprintf(d->name, sizeof d->name, "%s", name);
    snprintf(d->uuid, sizeof d->uuid, "%s", uuid);
    d->memory_total = memory_total;
    int index = (int)device_count++;
    pthread_mutex_unlock(&lock);
    return index;
}

int fake_nvml_add_energy(unsigned int index, unsigned long long mj) {
    DEVICE(index);
    d->energy_mj += mj;
    DONE;
}

int fake_nvml_set_power(unsigned int index, unsigned int mw) {
    DEVICE(index);
    d->power_mw = mw;
    DONE;
}

int fake_nvml_set_memory_used(unsigned int index, unsigned long long used) {
    DEVICE(index);
    d->memory_used = used;
    DONE;
}

int fake_nvml_set_utilization(unsigned int index, unsigned int gpu, unsigned int memory,
                              unsigned int encoder, unsigned int decoder) {
    DEVICE(index);
    d->utilization_gpu = gpu;
    d->utilization_memory = memory;
    d->encoder = encoder;
    d->decoder = decoder;
    DONE;
}

int fake_nvml_set_temperature(unsigned int index, unsigned int celsius) {
    DEVICE(index);
    d->temperature = celsius;
    DONE;
}

/* Adds or updates a compute process (used = ~0ULL: the driver does not say). */
int fake_nvml_set_process(unsigned int index, unsigned int pid, unsigned long long used) {
    DEVICE(index);
    for (unsigned i = 0; i < d->process_count; i++) {
        if (d->processes[i].pid == pid) {
            d->processes[i].usedGpuMemory = used;
            DONE;
        }
    }
    if (d->process_count == MAX_PROCESSES) {
        pthread_mutex_unlock(&lock);
        return -1;
    }
    nvmlProcessInfo_t *p = &d->processes[d->process_count++];
    memset(p, 0, sizeof *p);
    p->pid = pid;
    p->usedGpuMemory = used;
    DONE;
}

int fake_nvml_add_process_sample(unsigned int index, unsigned int pid, unsigned long long time_us,
                                 unsigned int sm, unsigned int memory, unsigned int encoder,
                                 unsigned int decoder) {
    DEVICE(index);
    if (d->sample_count == MAX_SAMPLES) {
        pthread_mutex_unlock(&lock);
        return -1;
    }
    nvmlProcessUtilizationSample_t *s = &d->samples[d->sample_count++];
    s->pid = pid;
    s->timeStamp = time_us;
    s->smUtil = sm;
    s->memUtil = memory;
    s->encUtil = encoder;
    s->decUtil = decoder;
    DONE;
}

/* Makes `function` return `code` for device `index` (ALL_DEVICES: every device, and the
 * calls without one); code 0 removes the failure. */
int fake_nvml_fail(const char *function, unsigned int index, int code) {
    pthread_mutex_lock(&lock);
    for (unsigned i = 0; i < MAX_FAILURES; i++) {
        struct failure *f = &failures[i];
        if (f->code != 0 && strcmp(f->function, function) == 0 && f->device == index) {
            f->code = code;
            DONE;
        }
    }
    for (unsigned i = 0; i < MAX_FAILURES && code != 0; i++) {
        struct failure *f = &failures[i];
        if (f->code == 0) {
            snprintf(f->function, sizeof f->function, "%s", function);
            f->device = index;
            f->code = code;
            DONE;
        }
    }
    pthread_mutex_unlock(&lock);
    return code == 0 ? 0 : -1;
}

/* How many times `function` was called since the last reset. */
unsigned long long fake_nvml_calls(const char *function) {
    pthread_mutex_lock(&lock);
    unsigned long long n = 0;
    for (unsigned i = 0; i < sizeof calls / sizeof calls[0]; i++) {
        if (strcmp(calls[i].function, function) == 0) n = calls[i].calls;
    }
    pthread_mutex_unlock(&lock);
    return n;
}
