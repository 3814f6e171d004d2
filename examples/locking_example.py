from procpool import Process, Lock, Queue
import os


def squared(x, lock, queue):
   module_name = __name__
   parent_id = os.getppid()
   process_id = os.getpid()

   result = x * x
   queue.put(result)

   lock.acquire()
   try:
      print(f'module={module_name} : parent={parent_id} : process={process_id} : result={result}')
   finally:
      lock.release()


if __name__ == '__main__':
   lock = Lock()
   queue = Queue()

   processes = [Process(target=squared, args=(x, lock, queue)) for x in range(10)]

   for process in processes:
      process.start()

   for process in processes:
      process.join()

   lock.acquire()
   try:
      while queue.qsize() != 0:
         print(queue.get())
   finally:
      lock.release()
