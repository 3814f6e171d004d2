import procpool as mp
import random
import os


def squared(x, queue):
   module_name = __name__
   parent_id = os.getppid()
   process_id = os.getpid()

   result = x * x

   print(f'module={module_name} : parent={parent_id} : process={process_id} : result={result}')
   queue.put(result)


if __name__ == '__main__':
   ctx = mp.get_context('spawn')
   q = ctx.Queue()

   processes = [ctx.Process(target=squared, args=(random.randint(0, 100), q)) for _ in range(10)]

   for p in processes:
      p.start()

   for p in processes:
      p.join()

   while q.qsize() != 0:
      print(q.get())
