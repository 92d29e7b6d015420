/* Host check of a nasopt C export: reads samples (int32 n, int32 size, n * size float32) from
 * argv[1] and writes the logits (n * NASOPT_NUM_CLASSES int32) to argv[2]. */
#include <stdio.h>
#include <stdlib.h>
#include "model.h"

int main(int argc, char **argv)
{
    FILE *in, *out;
    int32_t head[2], logits[NASOPT_NUM_CLASSES];
    float x[NASOPT_INPUT_SIZE];
    int32_t i;
    if (argc != 3 || !(in = fopen(argv[1], "rb")) || !(out = fopen(argv[2], "wb")))
        return 2;
    if (fread(head, sizeof head, 1, in) != 1 || head[1] != NASOPT_INPUT_SIZE)
        return 3;
    for (i = 0; i < head[0]; i++) {
        if (fread(x, sizeof x, 1, in) != 1)
            return 4;
        nasopt_logits(x, logits);
        if (nasopt_predict(x) < 0 || fwrite(logits, sizeof logits, 1, out) != 1)
            return 5;
    }
    fclose(in);
    return fclose(out) == 0 ? 0 : 6;
}
