/*
 * fakevfio: a user-space emulation of the VFIO kernel API, loaded into an unmodified
 * QEMU with LD_PRELOAD, so that `-device vfio-pci,sysfsdev=DIR` realizes a real vfio-pci
 * device without hardware, /dev/vfio or root. Built on demand by qmpguard (never shipped
 * as a binary). For qmpguard's demo and ground-truth tests only.
 *
 * What it emulates
 *   /dev/vfio/vfio       a type1v2 container: API version, extensions, SET_IOMMU,
 *                        IOMMU_GET_INFO, MAP_DMA / UNMAP_DMA (logged, see below)
 *   /dev/vfio/<group>    a viable group: GET_STATUS, SET/UNSET_CONTAINER, GET_DEVICE_FD
 *   device fd            a plain PCIe endpoint: 256 bytes of config space (pread/pwrite
 *                        at the config region offset) with a PCI Express capability
 *                        (v2, endpoint), one 4 KiB memory BAR0 without the mmap flag
 *                        (reads zero, writes ignored), INTx pin A, reset
 * QEMU finds the group from DIR/iommu_group (a symlink whose last component is the
 * group number; QEMU 7.2 and 10.0 only readlink it).
 *
 * Configuration (environment)
 *   QMPGUARD_VFIO_DMA_LOG           file to append one line per DMA map/unmap:
 *                                   "map c=<container> iova=0x.. size=0x.. vaddr=0x.."
 *                                   "unmap c=<container> iova=0x.. size=0x.."
 *                                   and one per group attached to / detached from a
 *                                   container (VFIO_GROUP_SET/UNSET_CONTAINER):
 *                                   "attach g=<group> c=<container>"
 *                                   "detach g=<group> c=<container>"
 *   QMPGUARD_VFIO_ID                vendor:device in hex for every device (1b36:0005)
 *   QMPGUARD_VFIO_EMUL_ALLOW_SHADOW "1" to run although a real /dev/vfio/vfio exists
 *                                   (by default the library refuses: it must never stand
 *                                   in front of real devices by accident)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/vfio.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_FDS 4096
#define REGION_SHIFT 40
#define CONFIG_SIZE 256
#define BAR0_SIZE 4096

enum kind { NONE, CONTAINER, GROUP, DEVICE };

struct object {
    enum kind kind;
    int id;          /* container id, group number, or device serial */
    int container;   /* groups: fd of the container they are set to, or -1 */
    uint8_t config[CONFIG_SIZE];
};

static struct object *objects[MAX_FDS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int next_container_id = 1;
static int next_device_id = 1;

static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_ioctl)(int, unsigned long, ...);
static ssize_t (*real_pread64)(int, void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static int (*real_close)(int);

static void resolve(void)
{
    if (real_open) {
        return;
    }
    real_open = dlsym(RTLD_NEXT, "open");
    real_open64 = dlsym(RTLD_NEXT, "open64");
    real_openat = dlsym(RTLD_NEXT, "openat");
    real_ioctl = dlsym(RTLD_NEXT, "ioctl");
    real_pread64 = dlsym(RTLD_NEXT, "pread64");
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_close = dlsym(RTLD_NEXT, "close");
}

static void refuse_to_shadow_real_vfio(void)
{
    static int checked;
    const char *allow = getenv("QMPGUARD_VFIO_EMUL_ALLOW_SHADOW");

    if (checked) {
        return;
    }
    checked = 1;
    if (access("/dev/vfio/vfio", F_OK) == 0 && !(allow && strcmp(allow, "1") == 0)) {
        fprintf(stderr, "fakevfio: refusing to run: a real /dev/vfio/vfio exists on this "
                        "host (set QMPGUARD_VFIO_EMUL_ALLOW_SHADOW=1 to override)\n");
        _exit(1);
    }
}

static void dma_log(const char *fmt, ...)
{
    const char *path = getenv("QMPGUARD_VFIO_DMA_LOG");
    char line[256];
    va_list ap;
    int fd, n;

    if (!path || !*path) {
        return;
    }
    va_start(ap, fmt);
    n = vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    fd = real_open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd >= 0) {
        if (write(fd, line, (size_t)n) < 0) {
            /* nothing useful to do: the log is best effort, QEMU must go on */
        }
        real_close(fd);
    }
}

/* A real fd for an emulated file, so close(), dup() and fd bookkeeping keep working. */
static int new_object(enum kind kind, int id)
{
    int fd = memfd_create("fakevfio", MFD_CLOEXEC);
    struct object *obj;

    if (fd < 0 || fd >= MAX_FDS) {
        if (fd >= 0) {
            real_close(fd);
        }
        errno = EMFILE;
        return -1;
    }
    obj = calloc(1, sizeof(*obj));
    obj->kind = kind;
    obj->id = id;
    obj->container = -1;
    pthread_mutex_lock(&lock);
    objects[fd] = obj;
    pthread_mutex_unlock(&lock);
    return fd;
}

static struct object *lookup(int fd)
{
    return (fd >= 0 && fd < MAX_FDS) ? objects[fd] : NULL;
}

/* ---------------------------------------------------------------- open() */

static int emulated_open(const char *path)
{
    const char *prefix = "/dev/vfio/";
    char *end;
    long group;

    if (!path || strncmp(path, prefix, strlen(prefix)) != 0) {
        return -2; /* not ours */
    }
    refuse_to_shadow_real_vfio();
    path += strlen(prefix);
    if (strcmp(path, "vfio") == 0) {
        int fd;
        pthread_mutex_lock(&lock);
        int id = next_container_id++;
        pthread_mutex_unlock(&lock);
        fd = new_object(CONTAINER, id);
        return fd;
    }
    group = strtol(path, &end, 10);
    if (end == path || *end != '\0' || group < 0) {
        errno = ENOENT;
        return -1;
    }
    return new_object(GROUP, (int)group);
}

/* The mode argument exists only with O_CREAT or O_TMPFILE. */
#define MODE_FROM(flags, mode)                       \
    do {                                             \
        if ((flags) & (O_CREAT | O_TMPFILE)) {       \
            va_list ap;                              \
            va_start(ap, flags);                     \
            mode = va_arg(ap, mode_t);               \
            va_end(ap);                              \
        }                                            \
    } while (0)

int open(const char *path, int flags, ...)
{
    mode_t mode = 0;
    int fd;

    resolve();
    if ((fd = emulated_open(path)) != -2) {
        return fd;
    }
    MODE_FROM(flags, mode);
    return real_open(path, flags, mode);
}

int open64(const char *path, int flags, ...)
{
    mode_t mode = 0;
    int fd;

    resolve();
    if ((fd = emulated_open(path)) != -2) {
        return fd;
    }
    MODE_FROM(flags, mode);
    return real_open64(path, flags, mode);
}

int openat(int dirfd, const char *path, int flags, ...)
{
    mode_t mode = 0;
    int fd;

    resolve();
    if ((fd = emulated_open(path)) != -2) {
        return fd;
    }
    MODE_FROM(flags, mode);
    return real_openat(dirfd, path, flags, mode);
}

int openat64(int dirfd, const char *path, int flags, ...) __attribute__((alias("openat")));
int __open_2(const char *path, int flags) { return open(path, flags); }
int __open64_2(const char *path, int flags) { return open64(path, flags); }

int close(int fd)
{
    struct object *obj;

    resolve();
    pthread_mutex_lock(&lock);
    obj = lookup(fd);
    if (obj) {
        objects[fd] = NULL;
    }
    pthread_mutex_unlock(&lock);
    free(obj);
    return real_close(fd);
}

/* ------------------------------------------------------- the device model */

static void device_init(struct object *dev)
{
    unsigned vendor = 0x1b36, device = 0x0005;
    const char *id = getenv("QMPGUARD_VFIO_ID");
    uint8_t *c = dev->config;

    if (id) {
        sscanf(id, "%x:%x", &vendor, &device);
    }
    memset(c, 0, CONFIG_SIZE);
    c[0x00] = vendor & 0xff;  c[0x01] = vendor >> 8;
    c[0x02] = device & 0xff;  c[0x03] = device >> 8;
    c[0x08] = 0x01;                          /* revision */
    c[0x0a] = 0x00; c[0x0b] = 0xff;          /* class: unassigned (ff00) */
    c[0x0e] = 0x00;                          /* header type 0, single function */
    c[0x10] = 0x00;                          /* BAR0: 32-bit memory, non-prefetchable */
    c[0x3d] = 0x01;                          /* interrupt pin A */
    c[0x06] = 0x10;                          /* status: capability list */
    c[0x34] = 0x40;                          /* first capability */
    c[0x40] = 0x10;                          /* PCI Express capability, last in the list */
    c[0x42] = 0x02;                          /* version 2, device/port type 0: endpoint */
}

static void config_write(struct object *dev, size_t off, const uint8_t *buf, size_t len)
{
    for (size_t i = 0; i < len && off + i < CONFIG_SIZE; i++) {
        size_t at = off + i;
        uint8_t v = buf[i];
        if (at < 0x04 || (at >= 0x06 && at < 0x0c) || at == 0x0e || at == 0x34 ||
            at == 0x3d || (at >= 0x40 && at < 0x48)) {
            continue;                            /* read-only: identity, status, caps */
        }
        if (at >= 0x10 && at < 0x14) {          /* BAR0: size-aligned address only */
            uint32_t mask = ~(uint32_t)(BAR0_SIZE - 1);
            v &= (uint8_t)(mask >> (8 * (at - 0x10)));
        } else if (at >= 0x14 && at < 0x28) {   /* BAR1-5 and cardbus: absent */
            v = 0;
        }
        dev->config[at] = v;
    }
}

static ssize_t device_rw(struct object *dev, void *buf, size_t len, off_t offset, int write)
{
    uint64_t index = (uint64_t)offset >> REGION_SHIFT;
    uint64_t off = (uint64_t)offset & ((1ULL << REGION_SHIFT) - 1);

    if (index == VFIO_PCI_CONFIG_REGION_INDEX) {
        if (off >= CONFIG_SIZE) {
            if (!write) {
                memset(buf, 0xff, len);  /* no extended config space */
            }
            return (ssize_t)len;
        }
        if (off + len > CONFIG_SIZE) {
            len = CONFIG_SIZE - off;
        }
        if (write) {
            config_write(dev, off, buf, len);
        } else {
            memcpy(buf, dev->config + off, len);
        }
        return (ssize_t)len;
    }
    if (index == VFIO_PCI_BAR0_REGION_INDEX && off < BAR0_SIZE) {
        if (!write) {
            memset(buf, 0, len);
        }
        return (ssize_t)len;
    }
    errno = EINVAL;
    return -1;
}

ssize_t pread64(int fd, void *buf, size_t len, off_t offset)
{
    struct object *obj;

    resolve();
    obj = lookup(fd);
    if (obj && obj->kind == DEVICE) {
        return device_rw(obj, buf, len, offset, 0);
    }
    return real_pread64(fd, buf, len, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t len, off_t offset)
{
    struct object *obj;

    resolve();
    obj = lookup(fd);
    if (obj && obj->kind == DEVICE) {
        return device_rw(obj, (void *)buf, len, offset, 1);
    }
    return real_pwrite64(fd, buf, len, offset);
}

ssize_t pread(int fd, void *buf, size_t len, off_t offset) __attribute__((alias("pread64")));

/* _FORTIFY_SOURCE builds (Debian's QEMU) call the checking variants. */
ssize_t __pread64_chk(int fd, void *buf, size_t len, off_t offset, size_t buflen)
{
    (void)buflen;
    return pread64(fd, buf, len, offset);
}
ssize_t __pread_chk(int fd, void *buf, size_t len, off_t offset, size_t buflen)
    __attribute__((alias("__pread64_chk")));
ssize_t pwrite(int fd, const void *buf, size_t len, off_t offset)
    __attribute__((alias("pwrite64")));

/* ------------------------------------------------------------- ioctl() */

static int container_ioctl(struct object *obj, unsigned long req, void *arg)
{
    switch (req) {
    case VFIO_GET_API_VERSION:
        return VFIO_API_VERSION;
    case VFIO_CHECK_EXTENSION: {
        unsigned long ext = (unsigned long)arg;
        return ext == VFIO_TYPE1v2_IOMMU || ext == VFIO_TYPE1_IOMMU;
    }
    case VFIO_SET_IOMMU:
        return 0;
    case VFIO_IOMMU_GET_INFO: {                 /* no capability chain: plain info */
        struct vfio_iommu_type1_info *info = arg;
        if (info->argsz < offsetof(struct vfio_iommu_type1_info, cap_offset)) {
            errno = EINVAL;
            return -1;
        }
        info->flags = VFIO_IOMMU_INFO_PGSIZES;
        info->iova_pgsizes = 4096 | (2UL << 20) | (1UL << 30);
        if (info->argsz >= sizeof(*info)) {
            info->cap_offset = 0;
        }
        return 0;
    }
    case VFIO_IOMMU_MAP_DMA: {
        struct vfio_iommu_type1_dma_map *map = arg;
        dma_log("map c=%d iova=0x%" PRIx64 " size=0x%" PRIx64 " vaddr=0x%" PRIx64 "\n",
                obj->id, (uint64_t)map->iova, (uint64_t)map->size, (uint64_t)map->vaddr);
        return 0;
    }
    case VFIO_IOMMU_UNMAP_DMA: {
        struct vfio_iommu_type1_dma_unmap *unmap = arg;
        dma_log("unmap c=%d iova=0x%" PRIx64 " size=0x%" PRIx64 "\n",
                obj->id, (uint64_t)unmap->iova, (uint64_t)unmap->size);
        return 0;
    }
    case VFIO_IOMMU_ENABLE:
    case VFIO_IOMMU_DISABLE:
        return 0;
    default:
        errno = ENOTTY;
        return -1;
    }
}

static int group_ioctl(struct object *obj, unsigned long req, void *arg)
{
    switch (req) {
    case VFIO_GROUP_GET_STATUS: {
        struct vfio_group_status *status = arg;
        status->flags = VFIO_GROUP_FLAGS_VIABLE;
        if (obj->container >= 0) {
            status->flags |= VFIO_GROUP_FLAGS_CONTAINER_SET;
        }
        return 0;
    }
    case VFIO_GROUP_SET_CONTAINER: {
        struct object *container = lookup(*(int *)arg);
        obj->container = *(int *)arg;
        dma_log("attach g=%d c=%d\n", obj->id, container ? container->id : -1);
        return 0;
    }
    case VFIO_GROUP_UNSET_CONTAINER: {
        struct object *container = lookup(obj->container);
        dma_log("detach g=%d c=%d\n", obj->id, container ? container->id : -1);
        obj->container = -1;
        return 0;
    }
    case VFIO_GROUP_GET_DEVICE_FD: {
        int fd;
        pthread_mutex_lock(&lock);
        int id = next_device_id++;
        pthread_mutex_unlock(&lock);
        fd = new_object(DEVICE, id);
        if (fd >= 0) {
            device_init(objects[fd]);
        }
        return fd;
    }
    default:
        errno = ENOTTY;
        return -1;
    }
}

static int device_ioctl(struct object *obj, unsigned long req, void *arg)
{
    (void)obj;
    switch (req) {
    case VFIO_DEVICE_GET_INFO: {
        struct vfio_device_info *info = arg;
        info->flags = VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET;
        info->num_regions = VFIO_PCI_NUM_REGIONS;
        info->num_irqs = VFIO_PCI_NUM_IRQS;
        if (info->argsz >= sizeof(*info)) {
            info->cap_offset = 0;
        }
        return 0;
    }
    case VFIO_DEVICE_GET_REGION_INFO: {
        struct vfio_region_info *info = arg;
        info->flags = 0;
        info->cap_offset = 0;
        info->size = 0;
        info->offset = (uint64_t)info->index << REGION_SHIFT;
        if (info->index == VFIO_PCI_BAR0_REGION_INDEX) {
            info->size = BAR0_SIZE;
            info->flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        } else if (info->index == VFIO_PCI_CONFIG_REGION_INDEX) {
            info->size = CONFIG_SIZE;
            info->flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        } else if (info->index >= VFIO_PCI_NUM_REGIONS) {
            errno = EINVAL;
            return -1;
        }
        return 0;
    }
    case VFIO_DEVICE_GET_IRQ_INFO: {
        struct vfio_irq_info *info = arg;
        if (info->index >= VFIO_PCI_NUM_IRQS) {
            errno = EINVAL;
            return -1;
        }
        info->flags = 0;
        info->count = 0;
        if (info->index == VFIO_PCI_INTX_IRQ_INDEX) {
            info->flags = VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE |
                          VFIO_IRQ_INFO_AUTOMASKED;
            info->count = 1;
        }
        return 0;
    }
    case VFIO_DEVICE_SET_IRQS:
    case VFIO_DEVICE_RESET:
        return 0;
    default:                                  /* hot reset, features, ...: not offered */
        errno = ENOTTY;
        return -1;
    }
}

int ioctl(int fd, unsigned long req, ...)
{
    struct object *obj;
    va_list ap;
    void *arg;

    resolve();
    va_start(ap, req);
    arg = va_arg(ap, void *);
    va_end(ap);
    obj = lookup(fd);
    if (!obj) {
        return real_ioctl(fd, req, arg);
    }
    switch (obj->kind) {
    case CONTAINER:
        return container_ioctl(obj, req, arg);
    case GROUP:
        return group_ioctl(obj, req, arg);
    case DEVICE:
        return device_ioctl(obj, req, arg);
    default:
        errno = ENOTTY;
        return -1;
    }
}
