/*
 * kprof: a kernel-level GPU profile of any CUDA process, for machines without Nsight.
 *
 * The CUDA driver loads this library into a process when CUDA_INJECTION64_PATH names it, and
 * calls InitializeInjection(); CUPTI's activity API then records every kernel, memcpy and
 * memset with its GPU start/end time. At exit it writes, for the records inside the window,
 * one line per kernel name: total ms, count, mean us, share of the window's GPU time, name
 * (mangled; tools/cuda/kprof/report.py demangles and groups). Works on our Rust binaries and on
 * the PyTorch reference alike, so the two can be compared kernel by kernel.
 *
 *   KPROF_OUT=path       where to write (default kprof.tsv)
 *   KPROF_GRID=1         key kernels by name and grid size (tells an elementwise kernel's size)
 *   KPROF_LAST_S=secs    only the records that start in the last `secs` seconds of GPU activity
 *                        (skips warm-up: PTX JIT, cuDNN algorithm search); default: all
 *
 * Build: tools/cuda/kprof/build.sh (needs the CUPTI headers of the nvidia-cuda-cupti wheel).
 */
#include <cupti.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

typedef struct {
  uint32_t name;  /* index into names */
  uint64_t start, end;
} Rec;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static Rec *recs;
static size_t n_recs, cap_recs;
static int by_grid; /* KPROF_GRID set */
static char **names;
static size_t n_names, cap_names;

/* Name interning: a small open-addressing hash table of string -> index. */
static uint32_t *slots; /* index + 1, 0 = empty */
static size_t n_slots;

static uint64_t hash(const char *s) {
  uint64_t h = 1469598103934665603ull;
  while (*s) h = (h ^ (unsigned char)*s++) * 1099511628211ull;
  return h;
}

static uint32_t intern(const char *s) {
  if (!s) s = "(unnamed)";
  if (n_names * 2 >= n_slots) {
    size_t ns = n_slots ? n_slots * 2 : 4096;
    uint32_t *nt = calloc(ns, sizeof *nt);
    for (size_t i = 0; i < n_slots; i++)
      if (slots[i]) {
        size_t j = hash(names[slots[i] - 1]) & (ns - 1);
        while (nt[j]) j = (j + 1) & (ns - 1);
        nt[j] = slots[i];
      }
    free(slots);
    slots = nt;
    n_slots = ns;
  }
  size_t j = hash(s) & (n_slots - 1);
  while (slots[j]) {
    if (strcmp(names[slots[j] - 1], s) == 0) return slots[j] - 1;
    j = (j + 1) & (n_slots - 1);
  }
  if (n_names == cap_names) {
    cap_names = cap_names ? cap_names * 2 : 1024;
    names = realloc(names, cap_names * sizeof *names);
  }
  names[n_names] = strdup(s);
  slots[j] = (uint32_t)(n_names + 1);
  return (uint32_t)n_names++;
}

static void push(const char *name, uint64_t start, uint64_t end) {
  pthread_mutex_lock(&lock);
  if (n_recs == cap_recs) {
    cap_recs = cap_recs ? cap_recs * 2 : (1 << 16);
    recs = realloc(recs, cap_recs * sizeof *recs);
  }
  recs[n_recs].name = intern(name);
  recs[n_recs].start = start;
  recs[n_recs].end = end;
  n_recs++;
  pthread_mutex_unlock(&lock);
}

static void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records) {
  *size = 16 << 20;
  *buffer = aligned_alloc(8, *size);
  *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size,
                                      size_t valid) {
  (void)ctx; (void)stream; (void)size;
  CUpti_Activity *r = NULL;
  char label[64];
  while (cuptiActivityGetNextRecord(buffer, valid, &r) == CUPTI_SUCCESS) {
    switch (r->kind) {
      case CUPTI_ACTIVITY_KIND_KERNEL:
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
        CUpti_ActivityKernel10 *k = (CUpti_ActivityKernel10 *)r;
        if (by_grid) {
          /* KPROF_GRID=1: kernels keyed by name and grid size too (an elementwise kernel's grid
             tells its tensor's size). */
          char keyed[512];
          snprintf(keyed, sizeof keyed, "%.400s <%u,%u,%u>", k->name ? k->name : "(unnamed)",
                   (unsigned)k->gridX, (unsigned)k->gridY, (unsigned)k->gridZ);
          push(keyed, k->start, k->end);
        } else {
          push(k->name, k->start, k->end);
        }
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        CUpti_ActivityMemcpy6 *m = (CUpti_ActivityMemcpy6 *)r;
        snprintf(label, sizeof label, "[memcpy kind %u]", (unsigned)m->copyKind);
        push(label, m->start, m->end);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        CUpti_ActivityMemset4 *m = (CUpti_ActivityMemset4 *)r;
        push("[memset]", m->start, m->end);
        break;
      }
      default:
        break;
    }
  }
  free(buffer);
}

static int by_start(const void *a, const void *b) {
  const Rec *x = a, *y = b;
  return x->start < y->start ? -1 : x->start > y->start;
}

typedef struct {
  uint32_t name;
  uint64_t total, count;
} Agg;

static int by_total(const void *a, const void *b) {
  const Agg *x = a, *y = b;
  return x->total > y->total ? -1 : x->total < y->total;
}

static void finish(void) {
  cuptiActivityFlushAll(1);
  pthread_mutex_lock(&lock);
  const char *path = getenv("KPROF_OUT") ? getenv("KPROF_OUT") : "kprof.tsv";
  FILE *f = fopen(path, "w");
  if (!f || n_recs == 0) {
    fprintf(stderr, "kprof: %zu records, cannot write %s\n", n_recs, path);
    if (f) fclose(f);
    pthread_mutex_unlock(&lock);
    return;
  }
  qsort(recs, n_recs, sizeof *recs, by_start);
  uint64_t last_end = 0;
  for (size_t i = 0; i < n_recs; i++)
    if (recs[i].end > last_end) last_end = recs[i].end;
  uint64_t from = recs[0].start;
  const char *w = getenv("KPROF_LAST_S");
  if (w) {
    uint64_t span = (uint64_t)(atof(w) * 1e9);
    if (last_end - from > span) from = last_end - span;
  }
  Agg *agg = calloc(n_names, sizeof *agg);
  uint64_t busy = 0, cover_end = 0, total = 0, first = 0;
  int any = 0;
  for (size_t i = 0; i < n_recs; i++) {
    Rec *r = &recs[i];
    if (r->start < from) continue;
    if (!any) { first = r->start; cover_end = r->start; any = 1; }
    uint64_t d = r->end - r->start;
    agg[r->name].name = r->name;
    agg[r->name].total += d;
    agg[r->name].count++;
    total += d;
    /* union of intervals (records are sorted by start) */
    if (r->end > cover_end) {
      busy += r->end - (r->start > cover_end ? r->start : cover_end);
      cover_end = r->end;
    }
  }
  double window_ms = (last_end - first) / 1e6;
  fprintf(f, "# window_ms\t%.3f\n# busy_ms\t%.3f\n# kernel_sum_ms\t%.3f\n", window_ms, busy / 1e6,
          total / 1e6);
  fprintf(f, "total_ms\tcount\tmean_us\tshare\tname\n");
  qsort(agg, n_names, sizeof *agg, by_total);
  for (size_t i = 0; i < n_names && agg[i].count; i++)
    fprintf(f, "%.3f\t%llu\t%.2f\t%.4f\t%s\n", agg[i].total / 1e6, (unsigned long long)agg[i].count,
            agg[i].total / 1e3 / agg[i].count, total ? (double)agg[i].total / total : 0.0,
            names[agg[i].name]);
  fclose(f);
  fprintf(stderr, "kprof: %zu records, window %.1f ms, GPU busy %.1f ms -> %s\n", n_recs, window_ms,
          busy / 1e6, path);
  pthread_mutex_unlock(&lock);
}

int InitializeInjection(void) {
  by_grid = getenv("KPROF_GRID") != NULL;
  if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS) {
    fprintf(stderr, "kprof: cuptiActivityRegisterCallbacks failed\n");
    return 0;
  }
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  atexit(finish);
  return 1;
}
