/*
 * A minimal multiboot (v1) guest that turns on amd-iommu DMA translation and halts.
 * Loaded with `-kernel`. Written from the AMD I/O Virtualization Technology register
 * layout as QEMU's model (hw/i386/amd_iommu.c, `dma-remap=on`) interprets it:
 *
 *  1. a device table of 65,536 entries, each valid with translation on (V, TV), paging
 *     mode 3, read+write permission and a root pointing at one empty (zeroed) page table:
 *     a domain with nothing mapped;
 *  2. device-table base, command buffer and event log registers (low dword first: QEMU
 *     latches the device-table and command-buffer bases on the write of the high dword);
 *  3. control register 0x1005: IOMMU, event log and command buffer enable;
 *  4. INVALIDATE_DEVTAB_ENTRY for every device ID. Only this command makes QEMU re-read
 *     an entry and switch that device's address space from pass-through to translated
 *     (enabling the IOMMU or INVALIDATE_ALL alone does not);
 *  5. COMPLETION_WAIT with a store: once the value lands, the queue has drained;
 *  6. "AMDVI\n" on the debug console (port 0xe9), then halt.
 *
 * After this a correctly bound VFIO container has nothing mapped; a misbound one still
 * has all guest RAM mapped. QEMU 7.2 and 10.0 accept the same programming but leave
 * every device in pass-through (no guest-driven switch before 10.1).
 */
#define AMDVI_BASE   0xfed80000   /* fixed in QEMU, also in the IOMMU's PCI capability */
#define REG_DEVTAB   0x0000
#define REG_CMDBUF   0x0008
#define REG_EVTLOG   0x0010
#define REG_CONTROL  0x0018
#define REG_CMD_TAIL 0x2008
#define CTRL_ON      0x1005       /* IommuEn | EventLogEn | CmdBufEn */
#define LEN_256      0x08000000   /* high dword, bits 59:56: 2^8 entries */

#define DEVTAB       0x00400000   /* 65,536 x 32 bytes = 2 MiB, 4 MiB up */
#define DEVTAB_SIZE  0x1ff        /* (511 + 1) x 4 KiB */
#define PAGE_TABLE   0x00600000   /* the empty top-level page table */
#define CMDBUF       0x00601000   /* 256 commands of 16 bytes */
#define EVTLOG       0x00602000   /* 256 events of 16 bytes */
#define WAIT_STORE   0x00603000   /* COMPLETION_WAIT writes WAIT_DATA here */
#define AREA_END     0x00604000
#define WAIT_DATA    0x4e4f4944   /* "DION" */

/* device table entry, first quadword: V | TV | Mode 3 | root | IR | IW */
#define DTE_LOW      (PAGE_TABLE | (3 << 9) | 0x3)
#define DTE_HIGH     0x60000000
#define OP_COMPLETION_WAIT 0x10000000  /* opcode in bits 63:60 (high dword of cmd[0]) */
#define OP_INVAL_DEVTAB    0x20000000

    .text
    .code32
    .align 4
multiboot_header:               /* first in .text: QEMU looks in the first 8 KiB */
    .long 0x1BADB002            /* magic */
    .long 0                     /* flags: nothing needed from the loader */
    .long -0x1BADB002           /* checksum */

    .globl _start
_start:
    cli
    cld
    /* zero the device table, page table, command buffer, event log and wait store */
    mov $DEVTAB, %edi
    mov $((AREA_END - DEVTAB) / 4), %ecx
    xor %eax, %eax
    rep stosl
    /* one entry per device ID */
    mov $DEVTAB, %edi
    mov $0x10000, %ecx
1:  movl $DTE_LOW, (%edi)
    movl $DTE_HIGH, 4(%edi)
    add $32, %edi
    dec %ecx
    jnz 1b

    mov $AMDVI_BASE, %ebx
    movl $(DEVTAB | DEVTAB_SIZE), REG_DEVTAB(%ebx)
    movl $0, REG_DEVTAB+4(%ebx)
    movl $CMDBUF, REG_CMDBUF(%ebx)
    movl $LEN_256, REG_CMDBUF+4(%ebx)
    movl $EVTLOG, REG_EVTLOG(%ebx)
    movl $LEN_256, REG_EVTLOG+4(%ebx)
    movl $CTRL_ON, REG_CONTROL(%ebx)

    /* INVALIDATE_DEVTAB_ENTRY for device IDs 0..65535, one command per tail update */
    xor %ecx, %ecx              /* device ID */
    xor %edi, %edi              /* tail offset in the ring */
2:  lea CMDBUF(%edi), %esi
    mov %ecx, (%esi)
    movl $OP_INVAL_DEVTAB, 4(%esi)
    movl $0, 8(%esi)
    movl $0, 12(%esi)
    add $16, %edi
    and $0xfff, %edi
    mov %edi, REG_CMD_TAIL(%ebx)
    inc %ecx
    cmp $0x10000, %ecx
    jne 2b

    /* COMPLETION_WAIT, store WAIT_DATA at WAIT_STORE */
    lea CMDBUF(%edi), %esi
    movl $(WAIT_STORE | 1), (%esi)
    movl $OP_COMPLETION_WAIT, 4(%esi)
    movl $WAIT_DATA, 8(%esi)
    movl $0, 12(%esi)
    add $16, %edi
    and $0xfff, %edi
    mov %edi, REG_CMD_TAIL(%ebx)
3:  cmpl $WAIT_DATA, WAIT_STORE
    jne 3b

    mov $0xe9, %dx
    mov $'A', %al
    out %al, %dx
    mov $'M', %al
    out %al, %dx
    mov $'D', %al
    out %al, %dx
    mov $'V', %al
    out %al, %dx
    mov $'I', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
4:  hlt
    jmp 4b
